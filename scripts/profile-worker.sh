#!/usr/bin/env bash
# Instructions per task of Warren's worker and of the raw-lapin baseline
# worker, counted by callgrind on the same preloaded drain, alternating.
#
#   scripts/profile-worker.sh [ROUNDS] [SIDE...]
#
# A SIDE is `warren` or `baseline`, or `warren=PATH` for another build of
# warren (to compare two commits); the default is `warren baseline`.
#
# Each run: a fresh prefix's topology (`warren topology apply`), N
# `diag.echo` tasks with ids published by Python pika (as `warren bench`
# publishes them: with ids, so each is delivered once), then the worker under
# `valgrind --tool=callgrind` until the management API shows the work queue
# empty and nothing unacknowledged, then SIGTERM. Figure: (instructions -
# memset) / N; the memset is lapin zeroing its buffers once per connection.
#
# Environment: WARREN_BIN (default target/release/warren), PROFILE_N
# (default 3000), PROFILE_CONFIG (a config file Warren's worker runs with,
# such as a flow limit to measure its cost), PROFILE_OUT (default /tmp/warren-profile: callgrind files
# are kept there for callgrind_annotate), WARREN_URL, WARREN_MGMT.
# Not part of the test suite: it takes about a minute per run.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-1}
shift || true
SIDES=("$@")
[ ${#SIDES[@]} -gt 0 ] || SIDES=(warren baseline)
BIN=${WARREN_BIN:-target/release/warren}
N=${PROFILE_N:-3000}
OUT=${PROFILE_OUT:-/tmp/warren-profile}
URL=${WARREN_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
MGMT=${WARREN_MGMT:-http://guest:guest@127.0.0.1:15672}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_venv tests/interop pika >/dev/null 2>&1
PY=tests/interop/.venv/bin/python
mkdir -p "$OUT"

# Waits until the queue has no message ready or unacknowledged and a
# consumer is attached (bounded: 10 minutes).
drained() {
    local q=$1 deadline=$((SECONDS + 600))
    while [ $SECONDS -lt $deadline ]; do
        local s
        s=$(curl -sf "$MGMT/api/queues/%2f/$q?columns=messages,consumers" || true)
        if echo "$s" | grep -q '"messages":0' && ! echo "$s" | grep -q '"consumers":0'; then
            return 0
        fi
        sleep 1
    done
    echo "profile-worker: $q not drained within 10 minutes" >&2
    return 1
}

# Deletes every queue and exchange named PREFIX.*.
forget() {
    local prefix=$1 kind name
    for kind in queues exchanges; do
        # The last name has no newline after it: add one, or read skips it.
        { curl -sf "$MGMT/api/$kind/%2f?columns=name"; echo; } | tr ',' '\n' |
            sed -n "s/.*\"name\":\"\($prefix\.[^\"]*\)\".*/\1/p" |
            while read -r name; do
                curl -sf -X DELETE "$MGMT/api/$kind/%2f/$name" >/dev/null || true
            done
    done
}

one() {
    local side=${1%%=*} bin=$BIN prefix file pid
    [ "$1" = "${1#*=}" ] || bin=${1#*=}
    prefix="prof$(date +%s%N | tail -c 7)"
    file="$OUT/$side.$prefix.out"
    WARREN__PREFIX=$prefix WARREN__BROKER__URL=$URL "$BIN" topology apply >/dev/null
    "$PY" tests/interop/publish_pika.py --url "$URL" --exchange "$prefix.tasks" \
        --routing-key diag.echo --body '{"n": 1}' --count "$N" --message-id "$prefix-t" >/dev/null
    # The management API's counts lag by up to its sampling interval.
    sleep 6
    if [ "$side" = warren ]; then
        WARREN_LOG=warn WARREN__PREFIX=$prefix WARREN__BROKER__URL=$URL \
            valgrind --tool=callgrind --callgrind-out-file="$file" \
            "$bin" ${PROFILE_CONFIG:+--config "$PROFILE_CONFIG"} worker --queues diag >/dev/null 2>"$OUT/$side.$prefix.log" &
    else
        WARREN__BROKER__URL=$URL valgrind --tool=callgrind --callgrind-out-file="$file" \
            "$BIN" bench-baseline-worker --prefetch 1000 --queue "$prefix.q.diag" \
            --events "$prefix.events" >/dev/null 2>"$OUT/$side.$prefix.log" &
    fi
    pid=$!
    sleep 6
    drained "$prefix.q.diag"
    kill -TERM $pid
    wait $pid || true
    forget "$prefix"
    local total memset
    total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    memset=$(callgrind_annotate "$file" 2>/dev/null | awk '/memset/ {gsub(",", "", $1); s += $1} END {print s + 0}')
    echo "$side ($bin) $prefix: $(( (total - memset) / N )) instructions per task (total $total, memset $memset, load $(cut -d' ' -f1 /proc/loadavg))"
}

for _ in $(seq "$ROUNDS"); do
    for side in "${SIDES[@]}"; do
        one "$side"
    done
done
