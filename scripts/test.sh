#!/usr/bin/env bash
# The whole Warren test suite, on a fresh machine or a developer's:
# toolchain, broker (started if needed), management API, Python interop venv,
# then formatting, lints, build and every test. Exits non-zero on the first
# failure; prints "all tests passed" at the end otherwise.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

step() { printf '\n==> %s\n' "$*" >&2; }

step "prerequisites"
ensure_rust full
ensure_broker
ensure_management
ensure_python_venv
ensure_chromium
ensure_compose
ensure_openssl
ensure_cargo_fuzz
ensure_container_tools

step "docker-compose config"
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.cluster.yml config -q

step "doc links"
scripts/check-links.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run target/debug/warren as a subprocess: build it first.
step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

# deploy/k8s, offline: kubernetes-validate's schemas, KEDA's fields, what
# Warren needs of them, and their warren.toml loaded by the binary above.
step "kubernetes manifests (scripts/validate-k8s.py)"
"$WARREN_INTEROP_PYTHON" scripts/validate-k8s.py --warren target/debug/warren

step "cargo test --workspace"
cargo test --workspace --no-fail-fast

# The image built from the Dockerfile (with the binary built above) and
# Warren run from it in containers on a private Docker engine; skipped, with
# the reason, where no engine can be started.
step "containers (scripts/test-containers.sh)"
scripts/test-containers.sh

# Each parser a stranger can reach, fuzzed briefly from its seeds; longer
# runs: scripts/fuzz.sh [SECONDS_PER_TARGET].
step "fuzz (brief)"
scripts/fuzz.sh "${WARREN_FUZZ_SECS:-10}"

echo "all tests passed"
