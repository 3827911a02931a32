#!/usr/bin/env bash
# Run Warren on this machine with a demo:
#   - make sure RabbitMQ and its management console run (installs/starts them if needed),
#   - build the release binary,
#   - start `warren up` (topology + scheduler + worker in one process) in the background,
#   - publish a demo batch of 500 diag.sleep tasks and follow it with a progress bar,
#   - print where to look, then keep Warren running until Ctrl-C (or SIGTERM).
#
# Usage: scripts/up.sh [--config FILE]
# WARREN__* environment variables (WARREN__PREFIX, WARREN__BROKER__URL, ...) are honoured.
# Warren's own log goes to target/warren-up.log (WARREN_UP_LOG to change).
# shellcheck disable=SC2317  # functions below run from traps
set -euo pipefail

usage() { sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

CONFIG_ARGS=()
CONFIG_FILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --config)
            [ $# -ge 2 ] || { echo "error: --config needs a FILE" >&2; exit 2; }
            CONFIG_FILE="$2"
            shift 2
            ;;
        --config=*)
            CONFIG_FILE="${1#--config=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "error: unknown argument '$1' (usage: scripts/up.sh [--config FILE])" >&2
            exit 2
            ;;
    esac
done
if [ -n "$CONFIG_FILE" ]; then
    [ -f "$CONFIG_FILE" ] || { echo "error: config file not found: $CONFIG_FILE" >&2; exit 2; }
    CONFIG_FILE="$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")"
    CONFIG_ARGS=(--config "$CONFIG_FILE")
fi

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

ensure_rust ""
ensure_broker
ensure_management

log "cargo build --release -p warren"
cargo build --release -p warren

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release/warren"
[ -x "$BIN" ] || die "build finished but $BIN is missing"
LOG="${WARREN_UP_LOG:-$TARGET_DIR/warren-up.log}"
mkdir -p "$(dirname "$LOG")"

# The prefix decides the queue names: WARREN__PREFIX wins, then a top-level
# `prefix = "..."` in the --config file, else "warren".
PREFIX="${WARREN__PREFIX:-}"
if [ -z "$PREFIX" ] && [ -n "$CONFIG_FILE" ]; then
    PREFIX="$(awk '/^[[:space:]]*\[/ { exit }
        match($0, /^[[:space:]]*prefix[[:space:]]*=[[:space:]]*["\047][^"\047]*["\047]/) {
            v = substr($0, RSTART, RLENGTH); sub(/^[^=]*=[[:space:]]*["\047]/, "", v); sub(/["\047]$/, "", v); print v; exit
        }' "$CONFIG_FILE")"
fi
PREFIX="${PREFIX:-warren}"

# The tracker's dashboard and API need credentials (or tracker.open = true).
# Unless the environment or the --config file sets tracker credentials, make
# a demo login `admin` and an admin API token, kept in files of
# target/warren-up/ (created once, mode 600) and named by environment variables.
DEMO_LOGIN=""
if [ -z "${WARREN__TRACKER__USERS:-}${WARREN__TRACKER__TOKENS:-}${WARREN__TRACKER__OPEN:-}" ] &&
    { [ -z "$CONFIG_FILE" ] || ! grep -Eq '^[[:space:]]*(users|tokens|open)[[:space:]]*=' "$CONFIG_FILE"; }; then
    SECRETS="$TARGET_DIR/warren-up"
    mkdir -p "$SECRETS"
    chmod 700 "$SECRETS"
    SECRETS="$(cd "$SECRETS" && pwd)"
    for f in tracker-admin.password tracker-admin.token; do
        if [ ! -s "$SECRETS/$f" ]; then
            (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$SECRETS/$f")
        fi
    done
    export WARREN__TRACKER__USERS="admin:admin:file:$SECRETS/tracker-admin.password"
    export WARREN__TRACKER__TOKENS="demo:admin:file:$SECRETS/tracker-admin.token"
    DEMO_LOGIN="user admin, password $(cat "$SECRETS/tracker-admin.password")"
    DEMO_TOKEN="API token in $SECRETS/tracker-admin.token"
fi

WARREN_PID=""
STOPPING=0
forward() {
    STOPPING=1
    if [ -n "$WARREN_PID" ] && kill -0 "$WARREN_PID" 2>/dev/null; then
        kill -s "$1" "$WARREN_PID" 2>/dev/null || true
    fi
}
# Wait for Warren to exit, however many signals arrive meanwhile; sets WARREN_STATUS.
wait_warren() {
    WARREN_STATUS=0
    while [ -n "$WARREN_PID" ]; do
        wait "$WARREN_PID" && WARREN_STATUS=0 || WARREN_STATUS=$?
        kill -0 "$WARREN_PID" 2>/dev/null || break
    done
}
on_exit() {
    if [ -n "$WARREN_PID" ] && kill -0 "$WARREN_PID" 2>/dev/null; then
        log "stopping Warren (pid $WARREN_PID)"
        kill -TERM "$WARREN_PID" 2>/dev/null || true
        wait_warren
    fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM
trap on_exit EXIT

log "starting: $BIN ${CONFIG_ARGS[*]} up   (log: $LOG)"
# Job control on for this one command: Warren gets its own process group, so a
# Ctrl-C reaches it once, through the trap above, and is not ignored by it.
set -m
"$BIN" "${CONFIG_ARGS[@]}" up >"$LOG" 2>&1 &
WARREN_PID=$!
set +m

died() {
    wait_warren
    WARREN_PID=""
    echo "---- last lines of $LOG ----" >&2
    tail -n 30 "$LOG" >&2 || true
    die "warren up exited (status $WARREN_STATUS) $1"
}

QUEUE="$PREFIX.q.diag"
secs="${WARREN_WAIT_SECS:-60}"
log "waiting up to ${secs}s for the topology (queue $QUEUE)"
for ((i = 0; ; i++)); do
    [ "$STOPPING" = 1 ] && break
    kill -0 "$WARREN_PID" 2>/dev/null || died "before the topology was applied"
    mgmt_get "queues/$BROKER_VHOST_ENC/$QUEUE" >/dev/null 2>&1 && break
    [ "$i" -lt "$secs" ] || die "queue $QUEUE did not appear within ${secs}s (see $LOG)"
    sleep 1 || true
done

if [ "$STOPPING" = 0 ]; then
    log "demo: 500 diag.sleep tasks of 20 ms each"
    demo_status=0
    "$BIN" "${CONFIG_ARGS[@]}" publish diag.sleep '{"ms":20}' --count 500 --wait || demo_status=$?
    if [ "$STOPPING" = 0 ] && [ "$demo_status" -ne 0 ]; then
        kill -0 "$WARREN_PID" 2>/dev/null || died "during the demo"
        warn "the demo batch failed (exit $demo_status); Warren is still running, see $LOG"
    fi
fi

if [ "$STOPPING" = 0 ]; then
    creds="user $WARREN_MGMT_USER"
    [ "$WARREN_MGMT_USER:$WARREN_MGMT_PASS" = guest:guest ] && creds="guest/guest"
    cli="$BIN${CONFIG_ARGS[*]:+ ${CONFIG_ARGS[*]}}"
    P="$PREFIX"
    cat <<EOF

Warren is running (pid $WARREN_PID, log: $LOG).

  Dashboard    http://${WARREN__TRACKER__LISTEN:-127.0.0.1:8089}/  (tasks, queues, failures, dead letters)
${DEMO_LOGIN:+               log in: $DEMO_LOGIN
               $DEMO_TOKEN (curl -H "Authorization: Bearer \$(cat FILE)")
}  Metrics      http://${WARREN__WORKER__LISTEN:-127.0.0.1:8090}/metrics (worker)  http://${WARREN__SCHEDULER__LISTEN:-127.0.0.1:8091}/metrics (scheduler)
  Console      $WARREN_MGMT_URL  ($creds)
    Queues     $P.q.io  $P.q.cpu  $P.q.diag   work queues
               $P.dead            tasks that failed for good
               $P.unroutable      tasks whose type matched no route
               $P.delay.intake  $P.dlx.intake   waiting for the scheduler
    Exchanges  $P.tasks (publish here)  $P.delay  $P.events  $P.control

  Publish more
    $cli publish diag.echo '{"hello":"world"}' --wait
    $cli publish diag.sleep '{"ms":200}' --count 1000
    $cli publish diag.fail '{"kind":"retryable","message":"flaky"}' --wait
    $cli publish diag.echo '{"urgent":true}' --priority 9 --wait

  Ctrl-C stops Warren.
EOF
fi

wait_warren
WARREN_PID=""
log "Warren exited (status $WARREN_STATUS)"
exit "$WARREN_STATUS"
