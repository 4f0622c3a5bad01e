#!/bin/busybox sh
# /init of the dirtier guest: mount the basics, read dirtier.* parameters
# from the kernel command line, run the workload forever.
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
fill=80 ws=16 hb=1000
for arg in $(/bin/busybox cat /proc/cmdline); do
  case "$arg" in
    dirtier.fill_pct=*) fill=${arg#*=} ;;
    dirtier.ws_mib=*) ws=${arg#*=} ;;
    dirtier.hb_ms=*) hb=${arg#*=} ;;
  esac
done
/bin/dirtier --fill-pct "$fill" --ws-mib "$ws" --hb-ms "$hb" > /dev/console 2>&1
echo "DIRTIER DIED status=$?" > /dev/console
while :; do /bin/busybox sleep 3600; done
