#!/bin/sh
# Writes this pod's redis.conf and sentinel.conf into the shared emptyDir. The master is whichever one the
# sentinels already agree on, so a restarted pod never comes back as a second master after a failover;
# only when no sentinel answers (the first start) is it pod 0.
set -eu
me="$(hostname).turnout-redis"

# Sentinel exits when a name in its config does not resolve: wait for this pod's own DNS record, which the
# headless Service publishes a moment after the pod gets its IP.
tries=0
until nslookup "$me" >/dev/null 2>&1 || [ "$tries" -ge 30 ]; do tries=$((tries + 1)); sleep 1; done

# The master the other pods' sentinels name, or nothing.
ask_sentinels() {
  for i in 0 1 2; do
    peer="turnout-redis-$i.turnout-redis"
    [ "$peer" = "$me" ] && continue
    answer="$(timeout 3 redis-cli -h "$peer" -p 26379 --raw sentinel get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)"
    # Only a pod name counts: a sentinel that is still starting answers nothing or an error.
    case "$answer" in turnout-redis-*) echo "$answer"; return ;; esac
  done
}

master="$(ask_sentinels)"
# The sentinels still name this pod, which lost its data with its emptyDir (a new pod, not a restarted
# container): starting as master would make the replicas copy the empty data set. Wait for the failover
# (down-after-milliseconds plus an election), then follow the new master.
if [ "$master" = "$me" ] && [ ! -d /data/appendonlydir ]; then
  tries=0
  while [ "$master" = "$me" ] && [ "$tries" -lt 60 ]; do tries=$((tries + 1)); sleep 1; master="$(ask_sentinels)"; done
fi
[ -n "$master" ] || master="turnout-redis-0.turnout-redis"

mkdir -p /conf
{
  echo "port 6379"
  echo "dir /data"
  # On the emptyDir, which outlives a container restart but not the pod: a crashed Redis comes back with
  # its data. Losing all three pods at once still loses Turnout's routes and history; that is the price of
  # a trial Redis (overlays/managed-redis is for keeping them).
  echo 'save ""'
  echo "appendonly yes"
  # Sentinels and replicas know each other by DNS name: pod IPs change when a pod is rescheduled.
  echo "replica-announce-ip $me"
  [ "$master" = "$me" ] || echo "replicaof $master 6379"
} > /conf/redis.conf
{
  echo "port 26379"
  echo "dir /data"
  echo "sentinel resolve-hostnames yes"
  echo "sentinel announce-hostnames yes"
  echo "sentinel announce-ip $me"
  # Two of the three sentinels must agree that the master is down before one fails over.
  echo "sentinel monitor mymaster $master 6379 2"
  echo "sentinel down-after-milliseconds mymaster 5000"
  echo "sentinel failover-timeout mymaster 60000"
  echo "sentinel parallel-syncs mymaster 1"
} > /conf/sentinel.conf
