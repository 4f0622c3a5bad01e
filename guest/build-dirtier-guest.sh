#!/usr/bin/env bash
# Builds the dirtier test guest: Debian's kernel (from Debian's package) and an
# initramfs whose /init runs the static `dirtier` program. Artifacts are cached
# outside the repository, keyed by the hash of this script and the sources:
#   ${DBMIGRATE_CACHE:-~/.cache/dbmigrate}/dirtier-<hash>/{vmlinuz,initramfs.cpio.gz}
# The last line of stdout is that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DBMIGRATE_CACHE:-$HOME/.cache/dbmigrate}
hash=$(cat "$here/build-dirtier-guest.sh" "$here/dirtier.c" "$here/dirtier-init.sh" | sha256sum | cut -c1-16)
out=$cache/dirtier-$hash
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ]; then
  echo "$out"
  exit 0
fi

missing=()
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-dirtier-guest: installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT

# Kernel: the exact package Debian's linux-image-amd64 points at.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq >&2
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "build-dirtier-guest: cannot resolve Debian's kernel package" >&2; exit 1; }
echo "build-dirtier-guest: kernel package $kpkg" >&2
(cd "$tmp" && apt-get download -qq "$kpkg" >&2)
dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/kernel"
cp "$tmp"/kernel/boot/vmlinuz-* "$tmp/vmlinuz"

# Initramfs: busybox, the dirtier, and /init.
root=$tmp/root
mkdir -p "$root/bin" "$root/proc" "$root/sys" "$root/dev"
cp /bin/busybox "$root/bin/busybox"
gcc -O2 -static -Wall -Wextra -Werror -o "$root/bin/dirtier" "$here/dirtier.c"
install -m 0755 "$here/dirtier-init.sh" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$tmp/initramfs.cpio.gz"

mkdir -p "$tmp/out"
mv "$tmp/vmlinuz" "$tmp/initramfs.cpio.gz" "$tmp/out/"
rm -rf "$out"
mv "$tmp/out" "$out"
echo "build-dirtier-guest: built $out" >&2
echo "$out"
