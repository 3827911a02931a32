#!/usr/bin/env bash
# Warren on the three-node cluster of scripts/cluster.sh beside Warren on one
# node of it, in one invocation: drain rate (`warren bench throughput`) and
# delay lateness (`warren bench delay`), first with the classic topology and
# every process on the first node alone, then with the replicated topology
# (every queue quorum, three replicas) and every process given all three
# nodes. The same nodes, the same build, minutes apart: compare the two.
#
#   scripts/bench-cluster.sh                 quick mode (a few minutes)
#   BENCH_N=50000 scripts/bench-cluster.sh   more tasks per drain
#
# Environment:
#   BENCH_N        tasks per throughput drain (default 20000)
#   BENCH_ROUNDS   throughput rounds, best of each side (default 2)
#   BENCH_RATE     delayed tasks per second (default 500)
#   BENCH_SECS     seconds of delayed publishing (default 10)
#   WARREN_BIN     the warren binary to run (default: target/release/warren,
#                  built here)
# A cluster already running (scripts/cluster.sh start) is used and left
# running; otherwise one is started and stopped at the end.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

n="${BENCH_N:-20000}"
rounds="${BENCH_ROUNDS:-2}"
rate="${BENCH_RATE:-500}"
secs="${BENCH_SECS:-10}"

if [ -z "${WARREN_BIN:-}" ]; then
    ensure_rust
    cargo build --release -p warren
    WARREN_BIN=target/release/warren
fi
[ -x "$WARREN_BIN" ] || die "WARREN_BIN=$WARREN_BIN is not an executable"

if port_open 127.0.0.1 5681; then
    log "using the running cluster (scripts/cluster.sh status)"
else
    # Stopped at the end, and also when its start fails half-way.
    trap 'scripts/cluster.sh stop' EXIT
    scripts/cluster.sh start
fi

# run LABEL URL MGMT REPLICATED: both scenarios with that broker setting.
run() {
    local label="$1"
    log "$label: warren bench throughput --n $n --rounds $rounds"
    WARREN__BROKER__URL="$2" WARREN__BROKER__MANAGEMENT_URL="$3" WARREN__TOPOLOGY__REPLICATED="$4" \
        "$WARREN_BIN" bench throughput --n "$n" --rounds "$rounds"
    log "$label: warren bench delay --rate $rate --duration $secs"
    WARREN__BROKER__URL="$2" WARREN__BROKER__MANAGEMENT_URL="$3" WARREN__TOPOLOGY__REPLICATED="$4" \
        "$WARREN_BIN" bench delay --rate "$rate" --duration "$secs"
}

run "classic, one node (warren-c1)" 'amqp://guest:guest@127.0.0.1:5681/%2f' http://127.0.0.1:15681 false
run "replicated, three nodes" "$(scripts/cluster.sh urls)" http://127.0.0.1:15681 true
