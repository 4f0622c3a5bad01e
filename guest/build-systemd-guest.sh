#!/usr/bin/env bash
# Builds the systemd test guest: the MariaDB guest's kernel and initramfs
# (guest/build-mariadb-guest.sh) with a Debian bookworm root that boots
# systemd and udev and runs MariaDB as Debian's mariadb.service: a VM as an
# operator keeps it, to test the guest agent's Debian package there.
#
# The initramfs hands this build's package over in /run/dbmigrate and
# switches to /sbin/dbm-init, which here only executes systemd. Two
# test-only units (in this image, never in the package):
#   dbm-test-install.service  installs the package with dpkg on the running
#                             system (its postinst makes udev start the
#                             agent's unit on the virtio-serial port)
#   dbm-test-restart.service  once the agent has answered a disks request,
#                             kills it (SIGKILL) and waits for systemd to
#                             restart it
# Their progress is on the console, as lines starting with "DBM-".
#
# Cached outside the repository, keyed by this script's hash and the
# MariaDB guest's directory:
#   ${DBMIGRATE_CACHE:-~/.cache/dbmigrate}/systemd-<hash>/{vmlinuz,initramfs.cpio.gz,rootfs.img}
# The last line of stdout is that directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DBMIGRATE_CACHE:-$HOME/.cache/dbmigrate}
base=$(bash "$here/build-mariadb-guest.sh" | tail -1)
hash=$( (cat "$here/build-systemd-guest.sh"; basename "$base") | sha256sum | cut -c1-16)
out=$cache/systemd-$hash
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/rootfs.img" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root

echo "build-systemd-guest: mmdebstrap bookworm with systemd (about 90 s)" >&2
mmdebstrap --variant=minbase --quiet \
  --include=mariadb-server,systemd-sysv,udev,kmod,procps \
  --customize-hook='rm -f "$1"/etc/machine-id' \
  bookworm "$root" http://deb.debian.org/debian >&2

# A machine id of its own, so that the first boot does not run
# systemd-firstboot (which may prompt on the console).
systemd-machine-id-setup --root="$root" >&2 2>/dev/null \
  || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$root/etc/machine-id"
echo dbmguest > "$root/etc/hostname"
# No login prompt or timers on the console of a test VM.
for u in systemd-firstboot.service serial-getty@ttyS0.service getty@tty1.service \
         apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done

# The initramfs switches to /sbin/dbm-init: here, systemd (as PID 1).
cat > "$root/sbin/dbm-init" <<'EOF'
#!/bin/sh
exec /lib/systemd/systemd
EOF
chmod 0755 "$root/sbin/dbm-init"

cat > "$root/usr/local/sbin/dbm-test-install" <<'EOF'
#!/bin/sh
# Test-only: installs the guest agent's package handed over by the initramfs.
say() { echo "DBM-$*" > /dev/console; }
deb=/run/dbmigrate/dbmigrate-guest-agent.deb
if dpkg -i "$deb" > /run/dbmigrate/dpkg.log 2>&1; then
  say "PACKAGE $(dpkg-query -W dbmigrate-guest-agent | tr '\t' ' ') installed"
else
  say "ERROR the package did not install: $(tail -3 /run/dbmigrate/dpkg.log | tr '\n' ' ')"
  exit 1
fi
EOF

cat > "$root/usr/local/sbin/dbm-test-restart" <<'EOF'
#!/bin/sh
# Test-only: once the agent's unit (started by udev, not by this script) has
# answered a disks request, kills the agent and waits for systemd's restart.
say() { echo "DBM-$*" > /dev/console; }
unit=dbmigrate-guest-agent.service
wait_for() { # SECONDS WHAT COMMAND...
  n=$1 what=$2
  shift 2
  i=0
  until "$@"; do
    i=$((i + 1))
    if [ $i -gt "$n" ]; then
      say "ERROR $what: $(systemctl status --no-pager $unit 2>&1 | head -8 | tr '\n' ' ')"
      exit 1
    fi
    sleep 1
  done
}
wait_for 300 "the agent's unit did not start" systemctl is-active -q $unit
pid=$(systemctl show -P MainPID $unit)
# Who wants it: the port's device unit (the udev rule's SYSTEMD_WANTS).
by=$(systemctl list-dependencies --reverse --plain $unit | grep -o '[^ ]*virtio[^ ]*\.device' | head -1)
say "UNIT active pid=$pid wanted-by=${by:-none}"
answered() { journalctl -q -b -u $unit | grep -q "disks named"; }
wait_for 600 "the agent never answered a disks request" answered
kill -KILL "$pid"
say "KILLED pid=$pid"
restarted() {
  [ "$(systemctl show -P NRestarts $unit)" -ge 1 ] && systemctl is-active -q $unit \
    && [ "$(systemctl show -P MainPID $unit)" != "$pid" ]
}
wait_for 120 "systemd did not restart the agent" restarted
say "RESTARTED pid=$(systemctl show -P MainPID $unit) restarts=$(systemctl show -P NRestarts $unit)"
EOF
chmod 0755 "$root/usr/local/sbin/dbm-test-install" "$root/usr/local/sbin/dbm-test-restart"

cat > "$root/etc/systemd/system/dbm-test-install.service" <<'EOF'
[Unit]
Description=dbmigrate test: install the guest agent's package from the initramfs
ConditionPathExists=/run/dbmigrate/dbmigrate-guest-agent.deb
After=systemd-udev-trigger.service local-fs.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dbm-test-install
[Install]
WantedBy=multi-user.target
EOF
cat > "$root/etc/systemd/system/dbm-test-restart.service" <<'EOF'
[Unit]
Description=dbmigrate test: kill the guest agent once, see systemd restart it
After=dbm-test-install.service
Requires=dbm-test-install.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/dbm-test-restart
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
for u in dbm-test-install.service dbm-test-restart.service; do
  ln -sf "/etc/systemd/system/$u" "$root/etc/systemd/system/multi-user.target.wants/$u"
done

# Root file system image: raw ext4 without a partition table, as the
# MariaDB guest's.
truncate -s 4G "$tmp/rootfs.img"
mkfs.ext4 -q -F -L dbmroot -d "$root" "$tmp/rootfs.img"

mkdir -p "$tmp/out"
cp "$base/vmlinuz" "$base/initramfs.cpio.gz" "$tmp/out/"
mv "$tmp/rootfs.img" "$tmp/out/"
rm -rf "$out"
mv "$tmp/out" "$out"
echo "build-systemd-guest: built $out" >&2
echo "$out"
