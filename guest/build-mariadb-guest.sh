#!/usr/bin/env bash
# Builds the MariaDB test guest: a Debian bookworm root file system with
# mariadb-server (mmdebstrap, minbase), as a raw ext4 image without a
# partition table (so that a FIEMAP block x 4096 is the byte offset on the
# disk), Debian's kernel from that root, and a busybox initramfs that loads
# the virtio modules and switches to /dev/vda, where /sbin/dbm-init brings up
# the network and MariaDB and starts the guest agent.
#
# Artifacts are cached outside the repository, keyed by the hash of this
# script and the guest init:
#   ${DBMIGRATE_CACHE:-~/.cache/dbmigrate}/mariadb-<hash>/{vmlinuz,initramfs.cpio.gz,rootfs.img}
# rootfs.img holds no tables yet: guest/prepare-mariadb-data.sh builds the
# sysbench data set natively on the host into a copy of it.
# The last line of stdout is that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DBMIGRATE_CACHE:-$HOME/.cache/dbmigrate}
hash=$(cat "$here/build-mariadb-guest.sh" "$here/mariadb-init.sh" "$here/mariadb-initramfs-init.sh" | sha256sum | cut -c1-16)
out=$cache/mariadb-$hash
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/rootfs.img" ]; then
  echo "$out"
  exit 0
fi

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-mariadb-guest: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root

echo "build-mariadb-guest: mmdebstrap bookworm (about 80 s)" >&2
mmdebstrap --variant=minbase --quiet \
  --include=mariadb-server,linux-image-amd64,kmod,iproute2,procps \
  --customize-hook='rm -f "$1"/etc/machine-id' \
  bookworm "$root" http://deb.debian.org/debian >&2

# MariaDB as the guest runs it: reachable from the client bridge, files owned
# by root (the data set is built by a host mariadbd running as root).
cat > "$root/etc/mysql/mariadb.conf.d/99-dbmigrate.cnf" <<'EOF'
[mariadbd]
user = root
bind-address = 0.0.0.0
skip-name-resolve
max_connections = 200
innodb_log_file_size = 256M
innodb_flush_log_at_trx_commit = 2
innodb_buffer_pool_load_at_startup = ON
innodb_buffer_pool_dump_at_shutdown = OFF
EOF
install -m 0755 "$here/mariadb-init.sh" "$root/sbin/dbm-init"
chown -R root:root "$root/var/lib/mysql"

kver=$(ls "$root/lib/modules" | head -1)
cp "$root/boot/vmlinuz-$kver" "$tmp/vmlinuz"

# Initramfs: busybox and the modules needed to mount /dev/vda, in dependency order.
ir=$tmp/initramfs
mkdir -p "$ir/bin" "$ir/proc" "$ir/sys" "$ir/dev" "$ir/newroot" "$ir/lib/modules"
cp /bin/busybox "$ir/bin/busybox"
for m in crc16 crc32c_generic mbcache jbd2 ext4 virtio_ring virtio virtio_pci_modern_dev \
         virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net virtio_console; do
  f=$(find "$root/lib/modules/$kver" -name "$m.ko*" | head -1)
  if [ -z "$f" ]; then
    # Built into the kernel: nothing to load.
    continue
  fi
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$ir/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$ir/lib/modules/$m.ko" ;;
    *) cp "$f" "$ir/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> "$ir/lib/modules/order"
done
install -m 0755 "$here/mariadb-initramfs-init.sh" "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$tmp/initramfs.cpio.gz"

# Root file system image: sparse, room for the data set.
truncate -s 8G "$tmp/rootfs.img"
mkfs.ext4 -q -F -L dbmroot -d "$root" "$tmp/rootfs.img"

mkdir -p "$tmp/out"
mv "$tmp/vmlinuz" "$tmp/initramfs.cpio.gz" "$tmp/rootfs.img" "$tmp/out/"
rm -rf "$out"
mv "$tmp/out" "$out"
echo "build-mariadb-guest: built $out" >&2
echo "$out"
