#!/usr/bin/env bash
# shellcheck disable=SC2317  # the cleanup functions run from traps
# Warren, Celery and Dramatiq side by side in one run: the same broker, the
# same throughput and latency workloads, alternating rounds, one table of
# medians and ratios to Warren (see BENCHMARKS.md, "Peers"). Warren's figures
# (and its raw-lapin baseline's) come from `warren bench` on the release
# binary, built here unless --warren-bin is given or warren is not among
# --peers. Makes bench/peers/.venv (pip, versions pinned in
# bench/peers/requirements.txt) the first time, or when the pins change.
#
#   scripts/bench-peers.sh [--quick] [--n N] [--rate R] [--duration S] [--rounds K]
#                          [--peers warren,celery,celery-events,dramatiq]
#                          [--scenarios throughput,latency] [--warren-bin PATH]
#                          [--celery-pool P] [--celery-concurrency C]
#                          [--celery-prefetch-multiplier M]
#                          [--dramatiq-processes P] [--dramatiq-threads T]
#                          [--dramatiq-prefetch Q]
#                          [--publishers K] [--wait-idle SECS] [--json]
#
# --quick is n=5000, 5 s of latency and 2 rounds (about 4 minutes on 2
# cores, plus the venv and the build the first time); the default is
# n=20000, 10 s and 3 rounds. --wait-idle SECS waits up to SECS before each
# measured phase for the machine to be idle (other load moves every figure;
# each scenario reports how much CPU other processes used meanwhile).
# Each peer runs on queues of its own (peerbench-<peer>-<random>.*), deleted
# afterwards. Prints the tables, or with --json one object per row and per
# summary on stdout (the rest goes to stderr). Exits non-zero, with one
# "error:" line, if a peer cannot be installed or fails.
#
# Environment: WARREN__BROKER__URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
# WARREN_MGMT_URL / WARREN_MGMT_USER / WARREN_MGMT_PASS as in scripts/lib.sh.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

PEERS_DIR="$WARREN_ROOT/bench/peers"
DRIVER="$PEERS_DIR/bench_peers.py"

for a in "$@"; do
    case "$a" in
        -h | --help)
            command -v python3 >/dev/null 2>&1 || die "python3 not found"
            exec python3 "$DRIVER" --help
            ;;
    esac
done

# bench/peers/.venv with the pinned peers (see ensure_venv in lib.sh).
ensure_peers_venv() {
    ensure_venv "$PEERS_DIR" "celery, dramatiq, pika"
    PEERS_PYTHON="$VENV_PYTHON"
}

# Does this run measure Warren with the binary built here? Not when
# --warren-bin names another one, nor when --peers leaves warren out.
wants_warren_build() {
    local prev="" a peers="warren"
    for a in "$@"; do
        case "$prev" in
            --peers) peers="$a" ;;
            --warren-bin) return 1 ;;
        esac
        case "$a" in
            --peers=*) peers="${a#--peers=}" ;;
            --warren-bin=*) return 1 ;;
        esac
        prev="$a"
    done
    [[ ",$peers," == *,warren,* ]]
}

ensure_broker
ensure_management
export WARREN_MGMT_URL WARREN_MGMT_USER WARREN_MGMT_PASS
ensure_peers_venv
if wants_warren_build "$@"; then
    ensure_rust
    log "cargo build --release -p warren"
    cargo build --release -p warren >&2 || die "cargo build --release -p warren failed"
fi

# The driver lists here the process group of every worker it runs ("pgid N")
# and each prefix and record directory it has not cleaned up yet ("prefix P",
# "tmp DIR"), so the trap can end the workers and delete the queues and files
# even if the driver itself was killed.
PIDFILE="$(mktemp -t bench-peers.XXXXXX)"
CHILD=""

# delete_prefixed KIND PREFIX: delete every queue or exchange named PREFIX*.
delete_prefixed() {
    local kind="$1" prefix="$2" name
    mgmt_get "$kind/$BROKER_VHOST_ENC?columns=name" 2>/dev/null |
        grep -o "\"name\":\"${prefix}[^\"]*\"" | cut -d'"' -f4 |
        while read -r name; do
            curl -sf -m 3 -o /dev/null -X DELETE -u "$WARREN_MGMT_USER:$WARREN_MGMT_PASS" \
                "$WARREN_MGMT_URL/api/$kind/$BROKER_VHOST_ENC/$name" || true
            warn "deleted leftover $kind entry $name"
        done || true
}

kill_workers() {
    local key val
    set +e
    if [ -f "$PIDFILE" ]; then
        while read -r key val; do
            if [ "$key" = pgid ] && [[ "$val" =~ ^[0-9]+$ ]]; then
                kill -KILL -- "-$val" 2>/dev/null || true
            fi
        done <"$PIDFILE"
        while read -r key val; do
            if [ "$key" = prefix ] && [[ "$val" =~ ^peerbench-[a-z]+-[0-9a-f]+$ ]]; then
                delete_prefixed queues "$val"
                delete_prefixed exchanges "$val"
            elif [ "$key" = tmp ] && [[ "$(basename "$val")" =~ ^peerbench-[a-z]+-[0-9a-f]+- ]] && [ -d "$val" ]; then
                rm -rf -- "$val"
            fi
        done <"$PIDFILE"
        rm -f "$PIDFILE" "$PIDFILE.tmp"
    fi
}

on_signal() {
    local code="$1" i
    trap - INT TERM
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        # The driver stops its workers and deletes its queues on SIGTERM.
        kill -TERM "$CHILD" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            kill -0 "$CHILD" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$CHILD" 2>/dev/null || true
    fi
    kill_workers
    exit "$code"
}

trap kill_workers EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

PYTHONDONTWRITEBYTECODE=1 "$PEERS_PYTHON" "$DRIVER" --pidfile "$PIDFILE" "$@" &
CHILD=$!
rc=0
wait "$CHILD" || rc=$?
CHILD=""
exit "$rc"
