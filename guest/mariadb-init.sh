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
agent_user=root
for w in $(cat /proc/cmdline); do
  case "$w" in
    dbm.ip=*) ip_addr=${w#dbm.ip=} ;;
    dbm.pool=*) pool=${w#dbm.pool=} ;;
    # The SQL user the guest agent logs in as (a test denies it SQL).
    dbm.agent_user=*) agent_user=${w#dbm.agent_user=} ;;
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
# The guest agent as operators install it: its Debian package (no systemd
# here to start its unit: this init starts it as the unit does).
if [ -f /run/dbmigrate/dbmigrate-guest-agent.deb ]; then
  if dpkg -i /run/dbmigrate/dbmigrate-guest-agent.deb >/run/dbmigrate/dpkg.log 2>&1; then
    echo "DBM-PACKAGE $(dpkg-query -W dbmigrate-guest-agent | tr '\t' ' ') installed"
  else
    echo "DBM-ERROR the guest agent's package did not install:"
    tail -5 /run/dbmigrate/dpkg.log
  fi
fi
DBMIGRATE_GUEST_AGENT_ARGS=""
[ -f /etc/default/dbmigrate-guest-agent ] && . /etc/default/dbmigrate-guest-agent
if [ -x /usr/sbin/dbmigrate-guest-agent ] && [ -n "$port" ]; then
  # Whether the agent's SQL user gets in (it needs SQL only for the
  # guest-side scan; the file layout comes from /proc).
  if mariadb -u "$agent_user" -e 'SELECT 1' >/dev/null 2>&1; then
    echo "DBM-SQL $agent_user allowed"
  else
    echo "DBM-SQL $agent_user denied"
  fi
  # Collection summaries (DBM-AGENT lines) on the console, logs in /run.
  # shellcheck disable=SC2086 # the unit splits the options the same way
  /usr/sbin/dbmigrate-guest-agent serve --port "$port" $DBMIGRATE_GUEST_AGENT_ARGS \
    --user "$agent_user" >/dev/console 2>/run/dbmigrate/agent.log &
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
