#!/usr/bin/env bash
# Warren's benchmark in quick mode (a few minutes): every scenario of
# `warren bench`, each Warren figure beside the raw-lapin baseline measured in
# the same run. Pass flags to override, e.g. `scripts/bench.sh --n 50000`;
# BENCH_SCENARIO=throughput runs one scenario.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

ensure_rust
ensure_broker
cargo build --release -p warren
scenario="${BENCH_SCENARIO:-all}"
echo "warren bench $scenario (quick mode) against ${WARREN__BROKER__URL:-amqp://127.0.0.1:5672}" >&2
exec target/release/warren bench "$scenario" --n 20000 --rate 1000 --duration 5 --hold 100000 "$@"
