#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for tests and benchmarks of failover.
#
#   scripts/rabbitmq-cluster.sh start      start the nodes (if not running), join them, apply the settings
#   scripts/rabbitmq-cluster.sh status     the cluster's members and which are running
#   scripts/rabbitmq-cluster.sh urls       the AMQP_URL list for guest (comma-separated)
#   scripts/rabbitmq-cluster.sh kill N     kill -9 node N (1-3): no shutdown, like a crashed host
#   scripts/rabbitmq-cluster.sh restart N  start node N again (it rejoins with its data)
#   scripts/rabbitmq-cluster.sh stop       stop every node and delete the data
#
# Each node is its own `rabbitmq-server` with its own node name (npc1@localhost ...), AMQP port
# (CLUSTER_PORT_BASE+1 ..., 5681-5683 by default; Erlang distribution on the AMQP port + 20000),
# data, log and config under CLUSTER_DIR (/var/tmp/npcbus-rabbitmq-cluster), no plugins. Nodes 2 and
# 3 join node 1 with `rabbitmqctl join_cluster`. The cluster runs beside the single broker on 5672
# and shares nothing with it but epmd and the Erlang cookie of the user they run as. Run as root
# (the nodes then run as the `rabbitmq` user, like Debian's service) or as that user.
#
# The broker definitions (vhost, a user per role, policies) are applied to it like to any broker:
#   RABBITMQ_NODENAME=npc1@localhost python -m npcbus.broker_setup apply
set -euo pipefail
DIR=${CLUSTER_DIR:-/var/tmp/npcbus-rabbitmq-cluster}
BASE=${CLUSTER_PORT_BASE:-5680}
NODES=3
BIN=${RABBITMQ_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then BIN=/usr/lib/rabbitmq/bin
  else BIN=$(dirname "$(command -v rabbitmq-server)"); fi
fi
RUN_USER=${RABBITMQ_USER:-rabbitmq}

node() { echo "npc$1@localhost"; }
port() { echo $((BASE + $1)); }

as_broker_user() {  # run a RabbitMQ command as the user the nodes run as, keeping RABBITMQ_* variables
  if [ "$(id -u)" = "0" ] && id "$RUN_USER" >/dev/null 2>&1; then
    local home; home=$(getent passwd "$RUN_USER" | cut -d: -f6)
    (cd "$home" && runuser -u "$RUN_USER" -- env HOME="$home" "$@")
  else
    "$@"
  fi
}

ctl() { local n=$1; shift; as_broker_user "$BIN/rabbitmqctl" -q -n "$(node "$n")" "$@"; }

node_env() {  # the environment of node N
  local n=$1 d="$DIR/node$1"
  echo RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$(port "$n")" \
    RABBITMQ_DIST_PORT=$(( $(port "$n") + 20000 )) RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_MNESIA_DIR="$d/mnesia/$(node "$n")" RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_PID_FILE="$d/pid" RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$(port "$1")") 2>/dev/null; }

start_node() {
  local n=$1 d="$DIR/node$1"
  if listening "$n"; then return 0; fi
  mkdir -p "$d/mnesia" "$d/log"
  cat > "$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(port "$n")
loopback_users = none
# a node that comes back rejoins its cluster (it does not start a cluster of its own)
cluster_partition_handling = pause_minority
EOF
  echo "[]." > "$d/enabled_plugins"
  : > "$d/rabbitmq-env.conf"
  echo "[]." > "$d/advanced.config"
  if [ "$(id -u)" = "0" ] && id "$RUN_USER" >/dev/null 2>&1; then chown -R "$RUN_USER" "$DIR"; fi
  # shellcheck disable=SC2046
  as_broker_user env $(node_env "$n") "$BIN/rabbitmq-server" -detached >/dev/null 2>&1 || true
}

wait_node() {
  local n=$1
  for _ in $(seq 1 120); do
    if listening "$n" && ctl "$n" await_startup >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "node $(node "$n") did not come up; its log: $DIR/node$n/log" >&2
  return 1
}

members() { ctl 1 eval 'rabbit_nodes:all_running().' 2>/dev/null || true; }

cmd=${1:-}
case "$cmd" in
  start)
    mkdir -p "$DIR"
    for n in $(seq 1 $NODES); do start_node "$n"; done
    for n in $(seq 1 $NODES); do wait_node "$n"; done
    for n in $(seq 2 $NODES); do
      if ! ctl 1 eval 'rabbit_nodes:all().' | grep -q "$(node "$n")"; then
        # the CLI logs the joining node's transient errors (tables of a node not yet running): quiet
        ctl "$n" stop_app >/dev/null 2>&1
        ctl "$n" reset >/dev/null 2>&1
        ctl "$n" join_cluster "$(node 1)" >/dev/null 2>"$DIR/join$n.log" || { cat "$DIR/join$n.log" >&2; exit 1; }
        ctl "$n" start_app >/dev/null 2>&1
      fi
    done
    for n in $(seq 1 $NODES); do wait_node "$n"; done
    echo "[cluster] running: $(members)"
    echo "[cluster] AMQP_URL=$("$0" urls)"
    ;;
  urls)
    urls=""
    for n in $(seq 1 $NODES); do urls="$urls${urls:+,}amqp://guest:guest@127.0.0.1:$(port "$n")/"; done
    echo "$urls"
    ;;
  status)
    for n in $(seq 1 $NODES); do
      if listening "$n"; then echo "$(node "$n") port $(port "$n") up"; else echo "$(node "$n") port $(port "$n") down"; fi
    done
    for n in $(seq 1 $NODES); do
      if listening "$n"; then ctl "$n" cluster_status 2>/dev/null | sed -n '1,20p'; break; fi
    done
    ;;
  kill)
    n=${2:?which node (1-$NODES)}
    pid=$(cat "$DIR/node$n/pid" 2>/dev/null || true)
    if [ -z "$pid" ]; then echo "node $n: no pid file" >&2; exit 1; fi
    kill -9 "$pid"
    # the node's epmd registration and port go with the process
    for _ in $(seq 1 50); do listening "$n" || break; sleep 0.1; done
    echo "[cluster] killed $(node "$n") (pid $pid)"
    ;;
  restart)
    n=${2:?which node (1-$NODES)}
    start_node "$n"
    wait_node "$n"
    echo "[cluster] $(node "$n") back: $(members)"
    ;;
  stop)
    for n in $(seq 1 $NODES); do
      if listening "$n"; then ctl "$n" stop >/dev/null 2>&1 || true; fi
      pid=$(cat "$DIR/node$n/pid" 2>/dev/null || true)
      if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    done
    rm -rf "$DIR"
    echo "[cluster] stopped"
    ;;
  *)
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
