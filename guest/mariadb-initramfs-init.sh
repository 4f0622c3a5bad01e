#!/bin/busybox sh
# Initramfs of the MariaDB test guest: load the virtio modules, mount /dev/vda
# and switch to it. The guest agent's Debian package appended to this
# initramfs as a second cpio archive (/dbmigrate-guest-agent.deb) is handed
# to the root on a tmpfs /run, where the init installs it with dpkg, so a
# new agent build never needs a new disk image.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "initramfs: cannot mount /dev/vda"
  exec sh
fi
mount -t tmpfs -o mode=0755 run /newroot/run
if [ -f /dbmigrate-guest-agent.deb ]; then
  mkdir -p /newroot/run/dbmigrate
  cp /dbmigrate-guest-agent.deb /newroot/run/dbmigrate/
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/dbm-init
