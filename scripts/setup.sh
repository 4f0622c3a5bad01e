#!/usr/bin/env bash
# Installs what dbmigrate's tests, demo and benchmarks need on a fresh Debian 12
# machine (run as root), and builds the test guest into the cache
# (${DBMIGRATE_CACHE:-~/.cache/dbmigrate}). Safe to run again: it only does
# what is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-img || need+=(qemu-utils)
have busybox || [ -x /bin/busybox ] || need+=(busybox-static)
have ip || need+=(iproute2)
have tc || need+=(iproute2)
have cpio || need+=(cpio)
have gcc || need+=(gcc libc6-dev)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
have mariadbd || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
have mkfs.ext4 || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
have losetup || need+=(mount)
have qemu-nbd || need+=(qemu-utils)
have sysbench || need+=(sysbench)
have mmdebstrap || need+=(mmdebstrap)
have mariadb || need+=(mariadb-client)
have xz || need+=(xz-utils)
have iperf3 || need+=(iperf3)
# libvirt: the libvirt tests run a libvirtd per test host.
have virsh || need+=(libvirt-clients)
# The storage tests stall a disk behind a FUSE view of it.
have bindfs || need+=(bindfs)
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system libvirt-daemon-driver-qemu)

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (network namespaces, tc and QEMU's page tracking need it)" >&2
  exit 1
fi
# qemu-system-x86 and qemu-utils must come from the same QEMU release: a
# qemu-utils from elsewhere (seen: a backported 10.0 on a machine image) is
# removed by apt when Debian's qemu-system-x86 arrives, so install them together.
# A newer qemu-utils that is already installed makes apt refuse instead, so
# ask for qemu-system-x86's own version (a downgrade if need be).
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "setup.sh: installing ${need[*]}" >&2
  apt-get update -qq
  case " ${need[*]} " in
    *" qemu-system-x86 "*)
      qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
      mapfile -t need < <(printf '%s\n' "${need[@]}" | grep -vx qemu-utils)
      need+=("qemu-utils=$qver")
      ;;
  esac
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades --no-install-recommends "${need[@]}" >&2
fi
for cmd in qemu-system-x86_64 qemu-img qemu-nbd sysbench mariadb mmdebstrap iperf3 virsh bindfs; do
  if ! have "$cmd"; then
    echo "setup.sh: $cmd is still missing after installing packages; install it by hand (apt-get install qemu-utils qemu-system-x86 sysbench mariadb-client mmdebstrap iperf3 libvirt-clients bindfs) and run setup.sh again" >&2
    exit 1
  fi
done
if ! have cargo; then
  echo "setup.sh: cargo is missing: install a Rust toolchain (1.85 or newer)" >&2
  exit 1
fi
# The kernel must offer userfaultfd write-protect (Linux 6.7+) or soft-dirty.
bash "$(dirname "$0")/../guest/build-dirtier-guest.sh" >/dev/null
# The MariaDB guest and the small data set its tests use.
bash "$(dirname "$0")/../guest/prepare-mariadb-data.sh" --tables 4 --rows 10000 >/dev/null
echo "setup.sh: ready" >&2
