#!/usr/bin/env bash
# Builds the sysbench data set (or, with --tpcc, a TPC-C database) natively
# on the host into a copy of the MariaDB guest's disk image: the image's own mariadbd runs in a chroot of
# the loop-mounted image (same server version as in the guest), sysbench
# prepares the tables, every table and index is scanned, and the buffer pool
# is dumped so that the guest loads it at startup (a warm pool without
# scanning under TCG).
#
#   prepare-mariadb-data.sh --tables N --rows N [--pool SIZE]
#   prepare-mariadb-data.sh --tpcc WAREHOUSES --loader PATH/TO/bench [--pool SIZE]
#
# Cached next to the base image, keyed by this script's hash (plus the
# TPC-C loader's sources) and the sizes:
#   <guest dir>/data-<hash>-<tables>x<rows>[-pool<SIZE>].img, data-<hash>-tpcc<W>.img
# (the pool in the name when it is not the default 1G: the dump that warms
# the guest's pool holds what fits in the native server's pool).
# A data set of more than 16M rows gets a 16 GiB disk (sparse) instead of 8.
# The last line of stdout is the image path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tables=4
rows=10000
pool=1G
tpcc=""
loader=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tables) tables=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --pool) pool=$2; shift 2 ;;
    --tpcc) tpcc=$2; shift 2 ;;
    --loader) loader=$2; shift 2 ;;
    *) echo "prepare-mariadb-data: unknown option $1 (use --tables N --rows N [--pool SIZE], or --tpcc W --loader BENCH)" >&2; exit 2 ;;
  esac
done
case "$tables$rows$tpcc" in
  *[!0-9]*) echo "prepare-mariadb-data: --tables, --rows and --tpcc take numbers" >&2; exit 2 ;;
esac
if [ -n "$tpcc" ] && [ ! -x "$loader" ]; then
  echo "prepare-mariadb-data: --tpcc needs --loader, the built bench binary (cargo build --release -p bench)" >&2
  exit 2
fi

guest=$(bash "$here/build-mariadb-guest.sh" | tail -1)
if [ -n "$tpcc" ]; then
  src=$here/..
  hash=$(cat "$here/prepare-mariadb-data.sh" "$src"/bench/src/tpcc/mod.rs "$src"/bench/src/tpcc/load.rs \
    "$src"/sql/tpcc-schema.sql | sha256sum | cut -c1-12)
  out=$guest/data-$hash-tpcc${tpcc}.img
else
  hash=$(cat "$here/prepare-mariadb-data.sh" | sha256sum | cut -c1-12)
  out=$guest/data-$hash-${tables}x${rows}.img
  [ "$pool" = 1G ] || out=${out%.img}-pool$pool.img
fi
case "$pool" in
  *[!0-9A-Za-z]*) echo "prepare-mariadb-data: --pool takes a size such as 1280M or 5G" >&2; exit 2 ;;
esac
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
command -v sysbench >/dev/null || {
  echo "prepare-mariadb-data: installing sysbench" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends sysbench >&2
}

tmp=$(mktemp -d "$guest/.prep.XXXX")
mnt=$tmp/mnt
mkdir -p "$mnt"
cleanup() {
  if [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  umount "$mnt/proc" 2>/dev/null || true
  umount "$mnt/dev" 2>/dev/null || true
  umount "$mnt/run" 2>/dev/null || true
  umount "$mnt" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

cp --sparse=always "$guest/rootfs.img" "$tmp/disk.img"
if [ -z "$tpcc" ] && [ $((tables * rows)) -gt 16000000 ]; then
  truncate -s 16G "$tmp/disk.img"
  e2fsck -fy "$tmp/disk.img" >&2 || [ $? -le 1 ]
  resize2fs "$tmp/disk.img" >&2
fi
mount -o loop "$tmp/disk.img" "$mnt"
mount -t proc proc "$mnt/proc"
mount --bind /dev "$mnt/dev"
mount -t tmpfs tmpfs "$mnt/run"
mkdir -p "$mnt/run/mysqld"

chroot "$mnt" /usr/sbin/mariadbd --user=root --skip-networking \
  --innodb-buffer-pool-size="$pool" --log-error=/run/mysqld/error.log &
pid=$!
sock=$mnt/run/mysqld/mysqld.sock
for _ in $(seq 1 600); do
  [ -S "$sock" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$mnt/run/mysqld/error.log" >&2; exit 1; }
  sleep 0.2
done
sql() { chroot "$mnt" mariadb -N -e "$1"; }
sql "CREATE DATABASE IF NOT EXISTS sbtest;
     CREATE USER IF NOT EXISTS 'sbtest'@'%' IDENTIFIED BY 'sbtest';
     GRANT ALL ON sbtest.* TO 'sbtest'@'%';
     FLUSH PRIVILEGES;"
if [ -n "$tpcc" ]; then
  echo "prepare-mariadb-data: TPC-C, $tpcc warehouses" >&2
  "$loader" tpcc load --socket "$sock" --warehouses "$tpcc" --jobs 2 >&2
  sql "GRANT ALL ON tpcc.* TO 'sbtest'@'%'; FLUSH PRIVILEGES;"
  # Every table and secondary index read once, so that the pool dump holds them.
  sql "USE tpcc; SELECT COUNT(*) FROM warehouse; SELECT COUNT(*) FROM district;
       SELECT COUNT(*), SUM(LENGTH(c_data)) FROM customer; SELECT COUNT(*) FROM customer FORCE INDEX (idx_customer_name);
       SELECT COUNT(*) FROM history; SELECT COUNT(*) FROM new_order; SELECT COUNT(*) FROM orders;
       SELECT COUNT(*) FROM orders FORCE INDEX (idx_orders_customer); SELECT COUNT(*), SUM(ol_amount) FROM order_line;
       SELECT COUNT(*), SUM(LENGTH(i_data)) FROM item; SELECT COUNT(*), SUM(LENGTH(s_data)) FROM stock;" >/dev/null
else
  echo "prepare-mariadb-data: ${tables} tables x ${rows} rows" >&2
  sysbench oltp_read_write --db-driver=mysql --mysql-socket="$sock" --mysql-user=root \
    --mysql-db=sbtest --tables="$tables" --table-size="$rows" --threads=2 prepare >&2
  for t in $(seq 1 "$tables"); do
    sql "SELECT COUNT(*), SUM(LENGTH(c)) FROM sbtest.sbtest$t; SELECT SUM(k) FROM sbtest.sbtest$t FORCE INDEX (k_$t);" >/dev/null
  done
fi
sql "SET GLOBAL innodb_buffer_pool_dump_pct = 100; SET GLOBAL innodb_buffer_pool_dump_now = ON;"
for _ in $(seq 1 600); do
  case "$(sql "SHOW STATUS LIKE 'Innodb_buffer_pool_dump_status'")" in
    *completed*) break ;;
  esac
  sleep 0.2
done
# The dump must survive shutdown; a clean shutdown leaves no redo to apply.
sql "SET GLOBAL innodb_fast_shutdown = 0"
kill "$pid"
wait "$pid" || true
pid=
echo "prepare-mariadb-data: $(du -sh "$mnt/var/lib/mysql" | cut -f1) of data; pool dump $(wc -l < "$mnt/var/lib/mysql/ib_buffer_pool") pages" >&2
umount "$mnt/run" "$mnt/dev" "$mnt/proc"
umount "$mnt"
mv "$tmp/disk.img" "$out"
echo "$out"
