#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside the default node, for
# trying Warren on a cluster and for the cluster benchmark.
#
#   scripts/cluster.sh start    start warren-c1..3@localhost and cluster them
#   scripts/cluster.sh status   each node's view of the cluster
#   scripts/cluster.sh stop     stop the nodes (even half-started) and remove their files
#   scripts/cluster.sh urls     the broker.url list of the nodes, one line
#
# Node i (1..3) is warren-c<i>@localhost with AMQP on 127.0.0.1:568<i>, the
# management API on 127.0.0.1:1568<i> (guest/guest) and Erlang distribution
# on 2568<i>. Its data, logs and configuration live in
# $WARREN_CLUSTER_DIR/c<i> (default ${TMPDIR:-/tmp}/warren-cluster). The nodes
# share an Erlang cookie of their own ($WARREN_CLUSTER_DIR/.erlang.cookie), so
# the default node (rabbit@localhost, 5672) is neither touched nor joined.
#
# Environment:
#   WARREN_CLUSTER_DIR                 where the nodes' files live (see above)
#   WARREN_CLUSTER_CONSUMER_TIMEOUT_MS consumer_timeout of every node (default: RabbitMQ's)
#   WARREN_WAIT_SECS                   bound of each wait (default 60)
#
# Point Warren at the cluster with
#   export WARREN__BROKER__URL="$(scripts/cluster.sh urls)"
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES=(1 2 3)
DIR="${WARREN_CLUSTER_DIR:-${TMPDIR:-/tmp}/warren-cluster}"
SECS="${WARREN_WAIT_SECS:-60}"
RMQ_BIN=/usr/lib/rabbitmq/bin

node_name() { echo "warren-c$1@localhost"; }
amqp_port() { echo "568$1"; }
mgmt_port() { echo "1568$1"; }
dist_port() { echo "2568$1"; }

# as_rabbitmq CMD...: run CMD as the rabbitmq user with HOME at the cluster's
# directory, so that server and CLI alike use the cluster's own cookie.
as_rabbitmq() {
    if [ "$(id -u)" -eq "$(id -u rabbitmq)" ]; then
        env HOME="$DIR" "$@"
    else
        as_root runuser -u rabbitmq -- env HOME="$DIR" "$@"
    fi
}

# ctl I ARGS...: rabbitmqctl against node I (each call bounded by 60 s).
ctl() {
    local i="$1"
    shift
    as_rabbitmq timeout 70 "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$i")" "$@"
}

prepare() {
    [ -x "$RMQ_BIN/rabbitmq-server" ] || die "RabbitMQ is not installed ($RMQ_BIN/rabbitmq-server missing): run scripts/test.sh once or apt-get install rabbitmq-server"
    id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user on this machine (install rabbitmq-server)"
    as_root mkdir -p "$DIR"
    if ! as_root test -s "$DIR/.erlang.cookie"; then
        # 20 random upper-case letters, as Erlang makes them.
        local cookie
        cookie="$(head -c 4096 /dev/urandom | LC_ALL=C tr -dc 'A-Z')"
        cookie="${cookie:0:20}"
        printf '%s' "$cookie" | as_root tee "$DIR/.erlang.cookie" >/dev/null
    fi
    as_root chown rabbitmq:rabbitmq "$DIR" "$DIR/.erlang.cookie"
    as_root chmod 700 "$DIR"
    as_root chmod 400 "$DIR/.erlang.cookie"
}

write_node_files() {
    local i="$1" d="$DIR/c$1"
    as_root mkdir -p "$d"
    {
        echo "listeners.tcp.local = 127.0.0.1:$(amqp_port "$i")"
        echo "management.tcp.ip = 127.0.0.1"
        echo "management.tcp.port = $(mgmt_port "$i")"
        if [ -n "${WARREN_CLUSTER_CONSUMER_TIMEOUT_MS:-}" ]; then
            [[ "$WARREN_CLUSTER_CONSUMER_TIMEOUT_MS" =~ ^[0-9]+$ ]] ||
                die "WARREN_CLUSTER_CONSUMER_TIMEOUT_MS must be a number of milliseconds (got '$WARREN_CLUSTER_CONSUMER_TIMEOUT_MS')"
            echo "consumer_timeout = $WARREN_CLUSTER_CONSUMER_TIMEOUT_MS"
        fi
    } | as_root tee "$d/rabbitmq.conf" >/dev/null
    echo '[rabbitmq_management].' | as_root tee "$d/enabled_plugins" >/dev/null
    as_root chown -R rabbitmq:rabbitmq "$d"
}

boot_node() {
    local i="$1" d="$DIR/c$1"
    log "starting $(node_name "$i") (AMQP 127.0.0.1:$(amqp_port "$i"), management $(mgmt_port "$i"))"
    # Through bash, which closes every inherited descriptor above stderr: a
    # lock held by the caller would otherwise stay held by the node.
    as_rabbitmq \
        RABBITMQ_NODENAME="$(node_name "$i")" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$(amqp_port "$i")" \
        RABBITMQ_DIST_PORT="$(dist_port "$i")" \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_PID_FILE="$d/pid" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
        bash -c 'for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done 2>/dev/null; exec "$@"' \
        close-fds "$RMQ_BIN/rabbitmq-server" -detached >&2
}

await_node() {
    local i="$1" deadline=$((SECONDS + SECS))
    until ctl "$i" -q await_startup -t 5 >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            as_root tail -n 30 "$DIR/c$i/log/$(node_name "$i").log" >&2 2>/dev/null || true
            die "$(node_name "$i") did not start within ${SECS}s (log above; clean up with: $0 stop)"
        fi
        sleep 1
    done
}

cmd_start() {
    local i port
    # Every port free before any node starts, so a refusal leaves nothing behind.
    for i in "${NODES[@]}"; do
        for port in "$(amqp_port "$i")" "$(mgmt_port "$i")" "$(dist_port "$i")"; do
            if port_open 127.0.0.1 "$port"; then
                die "port $port is taken (a node already runs? try: $0 status, or $0 stop)"
            fi
        done
    done
    prepare
    for i in "${NODES[@]}"; do
        write_node_files "$i"
        boot_node "$i"
    done
    for i in "${NODES[@]}"; do
        await_node "$i"
    done
    local first
    first="$(node_name "${NODES[0]}")"
    for i in "${NODES[@]:1}"; do
        log "joining $(node_name "$i") to $first"
        ctl "$i" -q stop_app >&2 || die "stop_app on $(node_name "$i") failed"
        # 3.10 logs harmless errors on a join: show its output only when it fails.
        local out
        out="$(ctl "$i" -q join_cluster "$first" 2>&1)" ||
            die "join_cluster of $(node_name "$i") to $first failed: $out"
        ctl "$i" -q start_app >&2 || die "start_app on $(node_name "$i") failed"
    done
    ctl "${NODES[0]}" -q await_online_nodes "${#NODES[@]}" -t "$SECS" >&2 ||
        die "the cluster did not reach ${#NODES[@]} running nodes within ${SECS}s"
    log "cluster of ${#NODES[@]} nodes running; broker.url list:"
    cmd_urls
}

# node_pids I: the beam processes of node I, found by the node name in
# their environment (there even when the node never finished booting).
node_pids() {
    local pid
    for pid in $(pgrep -x beam.smp || true); do
        if as_root cat "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' |
            grep -qx "RABBITMQ_NODENAME=$(node_name "$1")"; then
            echo "$pid"
        fi
    done
}

cmd_stop() {
    local i pid
    for i in "${NODES[@]}"; do
        # `shutdown` returns once the node's runtime has exited.
        if ctl "$i" -q shutdown -t 30 >/dev/null 2>&1; then
            log "stopped $(node_name "$i")"
        fi
        # Not answering, half-started or still there: end what is left.
        for pid in $(node_pids "$i"); do
            as_root kill -9 "$pid" 2>/dev/null || true
            log "killed $(node_name "$i") (pid $pid)"
        done
    done
    if as_root test -d "$DIR"; then
        as_root rm -rf "$DIR"
        log "removed $DIR"
    fi
}

cmd_status() {
    local i
    for i in "${NODES[@]}"; do
        printf '%s (AMQP %s): ' "$(node_name "$i")" "$(amqp_port "$i")"
        if ! as_root test -d "$DIR/c$i"; then
            echo "not set up"
            continue
        fi
        local running
        if running="$(ctl "$i" -q cluster_status --formatter json 2>/dev/null)"; then
            # The running nodes, as this node sees them.
            echo "$running" | sed -n 's/.*"running_nodes":\[\([^]]*\)\].*/running nodes: \1/p' | tr -d '"'
        else
            echo "down"
        fi
    done
}

cmd_urls() {
    local i urls=()
    for i in "${NODES[@]}"; do
        urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/%2f")
    done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    urls) cmd_urls ;;
    *) die "usage: $0 start|stop|status|urls" ;;
esac
