#!/usr/bin/env bash
# The dirtier demo (scripts/demo.sh --dirtier): two "hosts" (network namespaces src and dst) joined by a
# 1 Gbit/s shaped link; a running guest that keeps rewriting a working set
# and verifying all of its memory is live-migrated from src to dst with
# dbmigrate, while QEMU moves only device state. Run as root.
#
#   scripts/demo-dirtier.sh [--ram-mib 1024] [--ws-mib 16] [--link-mbit 1000]
set -euo pipefail
cd "$(dirname "$0")/.."
RAM_MIB=1024 WS_MIB=16 LINK_MBIT=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --ram-mib) RAM_MIB=$2; shift 2 ;;
    --ws-mib) WS_MIB=$2; shift 2 ;;
    --link-mbit) LINK_MBIT=$2; shift 2 ;;
    *) echo "demo-dirtier.sh: unknown option $1 (use --ram-mib, --ws-mib, --link-mbit)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
cargo build --release -p host-agent -p dbmigrate-preload >&2
GUEST=$(bash guest/build-dirtier-guest.sh | tail -n1)
BIN=$PWD/target/release
WORK=$(mktemp -d /tmp/dbmigrate-demo.XXXX)
SRC=dbmdemo-src DST=dbmdemo-dst
cleanup() {
  for ns in $SRC $DST; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del $ns 2>/dev/null || true
  done
  rm -f /dev/shm/dbmdemo-src /dev/shm/dbmdemo-dst
}
trap cleanup EXIT
cleanup

echo "== hosts: namespaces $SRC (10.78.0.1) and $DST (10.78.0.2), link shaped to ${LINK_MBIT} Mbit/s"
ip netns add $SRC; ip netns add $DST
ip link add dbmdemo-a type veth peer name dbmdemo-b
ip link set dbmdemo-a netns $SRC; ip link set dbmdemo-b netns $DST
ip -n $SRC addr add 10.78.0.1/24 dev dbmdemo-a; ip -n $SRC link set dbmdemo-a up; ip -n $SRC link set lo up
ip -n $DST addr add 10.78.0.2/24 dev dbmdemo-b; ip -n $DST link set dbmdemo-b up; ip -n $DST link set lo up
ip netns exec $SRC tc qdisc add dev dbmdemo-a root tbf rate ${LINK_MBIT}mbit burst 256kb latency 50ms
ip netns exec $DST tc qdisc add dev dbmdemo-b root tbf rate ${LINK_MBIT}mbit burst 256kb latency 50ms

qemu() { # ns name extra...
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" qemu-system-x86_64 -name "$name" -accel tcg,thread=single -cpu max -smp 1 -m "${RAM_MIB}M" \
    -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=/dev/shm/dbmdemo-$name,share=on" \
    -machine pc,memory-backend=ram0 -nodefaults -display none \
    -serial "file:$WORK/$name.serial" -qmp "unix:$WORK/$name.qmp,server=on,wait=off" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet dirtier.ws_mib=$WS_MIB dirtier.fill_pct=80" "$@" 2>"$WORK/$name.qemu.log" &
}

echo "== source VM: ${RAM_MIB} MiB, guest rewrites ${WS_MIB} MiB continuously and verifies all its memory"
# The preload library lets dbmigrate track the pages QEMU's guest writes.
eval "$("$BIN/dbmigrate" env --ram-path /dev/shm/dbmdemo-src) qemu $SRC src"
until grep -q "DIRTIER READY" "$WORK/src.serial" 2>/dev/null; do sleep 1; done
until grep "DIRTIER HB" "$WORK/src.serial" | grep -qv "passes=0 "; do sleep 1; done
grep "DIRTIER HB" "$WORK/src.serial" | tail -n1

echo "== destination VM waits (-S -incoming defer)"
qemu $DST dst -S -incoming defer
until [ -S "$WORK/dst.qmp" ]; do sleep 0.2; done

echo "== certificates: a CA and one certificate set per host (mutual TLS between the agents)"
bash scripts/make-pki.sh "$WORK/pki/ca" "$WORK/pki/src" source.demo 10.78.0.1 2>/dev/null
bash scripts/make-pki.sh "$WORK/pki/ca" "$WORK/pki/dst" destination.demo 10.78.0.2 2>/dev/null

ip netns exec $DST "$BIN/dbmigrate" receive --qmp "$WORK/dst.qmp" --listen 10.78.0.2:7000 \
  --tls-dir "$WORK/pki/dst" --tls-allow source.demo --run-dir "$WORK/run" \
  >"$WORK/receive.json" 2>"$WORK/receive.log" &
recv_pid=$!
echo "== migrating"
ip netns exec $SRC "$BIN/dbmigrate" migrate --qmp "$WORK/src.qmp" --to 10.78.0.2:7000 --progress always \
  --tls-dir "$WORK/pki/src" --run-dir "$WORK/run" --report "$WORK/report.json" >/dev/null
wait "$recv_pid" 2>/dev/null || true

echo "== after migration: the guest runs on the destination and keeps verifying its memory"
last=$(grep -c "DIRTIER HB" "$WORK/src.serial")
sleep 1
for i in $(seq 1 120); do
  n=$(grep "DIRTIER HB" "$WORK/dst.serial" 2>/dev/null | awk -F'passes=' '{split($2,a," "); print a[1]}' | sort -n | tail -n1)
  first=$(grep "DIRTIER HB" "$WORK/dst.serial" 2>/dev/null | head -n1 | awk -F'passes=' '{split($2,a," "); print a[1]}')
  if [ -n "$n" ] && [ -n "$first" ] && [ "$n" -ge $((first + 1)) ]; then break; fi
  sleep 1
done
grep "DIRTIER HB" "$WORK/dst.serial" | tail -n3
python3 - "$WORK/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"total {r['total_ms']} ms, downtime {r['downtime_ms']} ms, "
      f"{r['link_bytes']/1e6:.0f} MB between agents, RAM verified: {r['ram_verified']}, "
      f"stop: {r['stats']['stop_reason']}, rounds: {len(r['stats']['rounds'])}")
PY
echo "(source heartbeats: $last; logs and report in $WORK)"
