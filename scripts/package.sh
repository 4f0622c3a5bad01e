#!/usr/bin/env bash
# Builds the Debian packages (dpkg-deb, no other tool):
#   dbmigrate               the host agent (/usr/bin/dbmigrate) and the
#                           preload library QEMU loads (/usr/lib/dbmigrate/)
#   dbmigrate-guest-agent   the guest agent (/usr/sbin), its systemd unit,
#                           started by a udev rule when the VM has the
#                           virtio-serial port org.dbmigrate.hints, and
#                           /etc/default/dbmigrate-guest-agent for its options
#
#   scripts/package.sh [OUT_DIR]      (default: target/debian)
#
# Builds the release binaries (cargo: nothing to do when they are current)
# and packages them stripped. The last lines of
# stdout are the two package files.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
version=$(awk -F'"' '/^\[workspace.package\]/ {p = 1} p && /^version/ {print $2; exit}' Cargo.toml)
arch=$(dpkg --print-architecture)
bins=target/release
# From the current sources (quick when nothing changed); not when run by a
# cargo command (a test), which holds the build directory and built them.
if [ -z "${CARGO:-}" ]; then
  cargo build --release --locked -p host-agent -p guest-agent -p dbmigrate-preload >&2
fi
protocol=$("$bins/dbmigrate" --version | sed -n 's/.*(protocol \([0-9]*\)).*/\1/p')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

control() { # NAME DEPENDS DESCRIPTION-LINES...
  local name=$1 depends=$2
  shift 2
  mkdir -p "$work/$name/DEBIAN"
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: dbmigrate developers <dbmigrate@localhost>"
    echo "Section: admin"
    echo "Priority: optional"
    echo "Depends: $depends"
    echo "Installed-Size: $(du -sk --exclude=DEBIAN "$work/$name" | cut -f1)"
    printf 'Description: %s\n' "$1"
    shift
    for l in "$@"; do printf ' %s\n' "$l"; done
  } > "$work/$name/DEBIAN/control"
}

install_bin() { # SRC DEST MODE
  install -D -m "$3" "$1" "$2"
  strip --strip-debug "$2"
}

# The host agent.
h=$work/dbmigrate
install_bin "$bins/dbmigrate" "$h/usr/bin/dbmigrate" 755
install_bin "$bins/libdbmigrate_preload.so" "$h/usr/lib/dbmigrate/libdbmigrate_preload.so" 644
install -D -m 644 README.md "$h/usr/share/doc/dbmigrate/README.md"
control dbmigrate "libc6 (>= 2.34), libgcc-s1" \
  "database-aware live migration of QEMU/KVM VMs (host agent)" \
  "dbmigrate moves a running VM's RAM itself, rebuilding clean InnoDB" \
  "buffer-pool pages from shared storage instead of sending them; QEMU moves" \
  "only device state. Wire protocol $protocol. Suggested: libvirt-clients for" \
  "libvirt domains (migrate --libvirt), qemu-system-x86."
dpkg-deb --root-owner-group --build "$h" "$out/dbmigrate_${version}_${arch}.deb" >&2

# The guest agent.
g=$work/dbmigrate-guest-agent
install_bin "$bins/dbmigrate-guest-agent" "$g/usr/sbin/dbmigrate-guest-agent" 755
install -D -m 644 packaging/dbmigrate-guest-agent.service "$g/lib/systemd/system/dbmigrate-guest-agent.service"
install -D -m 644 packaging/60-dbmigrate-guest-agent.rules "$g/lib/udev/rules.d/60-dbmigrate-guest-agent.rules"
install -D -m 644 packaging/dbmigrate-guest-agent.default "$g/etc/default/dbmigrate-guest-agent"
install -D -m 644 README.md "$g/usr/share/doc/dbmigrate-guest-agent/README.md"
control dbmigrate-guest-agent "libc6 (>= 2.34), libgcc-s1, zlib1g" \
  "dbmigrate guest agent: buffer-pool hints for live migration" \
  "Runs inside a VM with MariaDB, MySQL or Percona Server and tells the" \
  "dbmigrate host agents where its InnoDB buffer-pool frames are and where" \
  "each page lives on the VM's disk, over the virtio-serial port" \
  "org.dbmigrate.hints. Started by udev and systemd when the port appears."
echo /etc/default/dbmigrate-guest-agent > "$g/DEBIAN/conffiles"
cat > "$g/DEBIAN/postinst" <<'EOS'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  udevadm control --reload-rules || true
  # A VM that already has the port starts the agent now.
  udevadm trigger --subsystem-match=virtio-ports --action=add || true
fi
EOS
cat > "$g/DEBIAN/prerm" <<'EOS'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop dbmigrate-guest-agent.service || true
fi
EOS
cat > "$g/DEBIAN/postrm" <<'EOS'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
EOS
chmod 755 "$g/DEBIAN/postinst" "$g/DEBIAN/prerm" "$g/DEBIAN/postrm"
dpkg-deb --root-owner-group --build "$g" "$out/dbmigrate-guest-agent_${version}_${arch}.deb" >&2

echo "$out/dbmigrate_${version}_${arch}.deb"
echo "$out/dbmigrate-guest-agent_${version}_${arch}.deb"
