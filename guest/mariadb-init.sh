#!/bin/sh
# /sbin/dbm-init of the MariaDB test guest (PID 1, no systemd): network from
# the kernel command line (dbm.ip=ADDR/LEN), MariaDB with the buffer pool
# size dbm.pool=SIZE, the dbmigrate guest agent on the virtio-serial port
# org.dbmigrate.hints. Progress lines start with "DBM-" on the console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
hostname dbmguest
ip link set lo up

ip_addr=""
pool=256M
for w in $(cat /proc/cmdline); do
  case "$w" in
    dbm.ip=*) ip_addr=${w#dbm.ip=} ;;
    dbm.pool=*) pool=${w#dbm.pool=} ;;
  esac
done
nic=""
i=0
while [ -z "$nic" ] && [ $i -lt 100 ]; do
  for n in /sys/class/net/*; do
    n=${n##*/}
    [ "$n" = lo ] || { nic=$n; break; }
  done
  [ -n "$nic" ] || { sleep 0.1; i=$((i + 1)); }
done
if [ -n "$nic" ] && [ -n "$ip_addr" ]; then
  ip addr add "$ip_addr" dev "$nic"
  ip link set "$nic" up
  echo "DBM-NET $nic $ip_addr"
else
  echo "DBM-ERROR no network (nic='$nic' ip='$ip_addr')"
fi

mkdir -p /run/mysqld
mariadbd --innodb-buffer-pool-size="$pool" --log-error=/run/mysqld/error.log &
i=0
until mariadb -e 'SELECT 1' >/dev/null 2>&1; do
  sleep 0.5
  i=$((i + 1))
  if [ $i -gt 600 ]; then
    echo "DBM-ERROR mariadb did not start"
    tail -20 /run/mysqld/error.log
    break
  fi
done
echo "DBM-READY mariadb"

port=""
for d in /sys/class/virtio-ports/*; do
  [ -e "$d/name" ] && [ "$(cat "$d/name")" = org.dbmigrate.hints ] && port=/dev/${d##*/}
done
if [ -x /run/dbmigrate/dbmigrate-guest-agent ] && [ -n "$port" ]; then
  # Collection summaries (DBM-AGENT lines) on the console, logs in /run.
  /run/dbmigrate/dbmigrate-guest-agent serve --port "$port" --disk /dev/vda \
    >/dev/console 2>/run/dbmigrate/agent.log &
  echo "DBM-READY agent $port"
else
  echo "DBM-NOAGENT (port '$port')"
fi

# The buffer pool dump made with the data set loads in the background.
i=0
while [ $i -lt 1200 ]; do
  s=$(mariadb -N -e "SHOW STATUS LIKE 'Innodb_buffer_pool_load_status'" 2>/dev/null)
  case "$s" in
    *completed*|*"not started"*) break ;;
  esac
  sleep 1
  i=$((i + 1))
done
echo "DBM-READY pool: $(mariadb -N -e "SHOW STATUS LIKE 'Innodb_buffer_pool_pages_data'" | tr '\t' ' ')"

# PID 1 reaps orphans.
while :; do wait; sleep 1; done
