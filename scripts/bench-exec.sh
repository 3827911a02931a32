#!/usr/bin/env bash
# Tasks/s of `[[exec]]` handlers beside Celery (BENCHMARKS.md, "Exec
# handlers"): a trivial program (/bin/true) and a trivial Python handler
# (bench/exec/trivial.py) drained by `warren worker` at the shipped
# settings (worker.concurrency = 8), then Celery's prefork worker draining
# the same number of trivial tasks (scripts/bench-peers.sh --peers celery
# --scenarios throughput: its default concurrency, one process per CPU).
#
#   scripts/bench-exec.sh [--n N] [--rounds K]      (defaults: 3000, 2)
#
# Builds target/release/warren, makes bench/peers/.venv (pika, Celery) the
# first time. Prints one JSON object per handler and round, then Celery's
# rows (--json of bench-peers.sh), on stdout. Every task must succeed.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

N=3000
ROUNDS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --n) N="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

ensure_broker
ensure_management
export WARREN_MGMT_URL WARREN_MGMT_USER WARREN_MGMT_PASS
ensure_venv "$WARREN_ROOT/bench/peers" "celery, dramatiq, pika"
PY="$VENV_PYTHON"
ensure_rust
log "cargo build --release -p warren"
cargo build --release -p warren >&2 || die "cargo build --release -p warren failed"

log "exec handlers: $N tasks, $ROUNDS rounds"
PYTHONDONTWRITEBYTECODE=1 "$PY" bench/exec/bench_exec.py \
    --warren-bin "$WARREN_ROOT/target/release/warren" --n "$N" --rounds "$ROUNDS"
log "celery prefork: $N tasks, $ROUNDS rounds"
scripts/bench-peers.sh --peers celery --scenarios throughput --n "$N" --rounds "$ROUNDS" --json
