#!/usr/bin/env bash
# Fuzz the parsers a stranger can reach (fuzz/fuzz_targets/): build every
# target once with cargo-fuzz (libFuzzer, AddressSanitizer, overflow checks),
# then run each for a bounded time from its committed seeds
# (fuzz/corpus/<target>/).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; the targets default to all of them.
# Inputs the fuzzer finds are kept in fuzz/target/corpus/<target>/ (not in
# git; later runs start from them too). A crash, panic or hang fails the
# script, after every target has run, naming the input that caused it
# (fuzz/artifacts/<target>/) and how to replay it.
#
# Environment: FUZZ_SANITIZER (address, the default, or none: only panics,
# hangs and running out of memory caught).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$WARREN_ROOT"

secs="${1:-60}"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "SECONDS_PER_TARGET must be a whole number of seconds above 0 (got '$secs')"
shift || true

ensure_rust
ensure_cargo_fuzz

# cargo-fuzz passes -Zsanitizer=...; RUSTC_BOOTSTRAP lets the stable toolchain
# accept it (no nightly toolchain needed).
export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
build_args=(--fuzz-dir fuzz -O --debug-assertions --sanitizer "$sanitizer" --target "$triple")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
[ "${#targets[@]}" -gt 0 ] || die "no fuzz targets found in fuzz/fuzz_targets"

log "building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
start=$SECONDS
cargo fuzz build "${build_args[@]}" >&2 || die "cargo fuzz build failed"
log "built in $((SECONDS - start)) s"

bin_dir="fuzz/target/$triple/release"
failed=()
for t in "${targets[@]}"; do
    [ -d "fuzz/corpus/$t" ] || die "no seed corpus fuzz/corpus/$t for target $t"
    [ -x "$bin_dir/$t" ] || die "no fuzz target $t (see: cargo fuzz list --fuzz-dir fuzz)"
    work="fuzz/target/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$work" "$artifacts"
    log "fuzzing $t for ${secs}s"
    # New inputs go to the first directory; the seeds are only read. A run
    # ends at the time limit, or at the first crash, leak or input slower
    # than 10 s, which it writes to $artifacts.
    if "$bin_dir/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" \
        "$work" "fuzz/corpus/$t" 2>"$work.log"; then
        grep -E '^(stat::number_of_executed_units|Done )' "$work.log" >&2 || true
    else
        failed+=("$t")
        tail -n 40 "$work.log" >&2
        warn "fuzz target $t failed (full log: $work.log)"
        for input in $(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$work.log"); do
            warn "input: $input"
            warn "replay: $bin_dir/$t $input"
        done
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    die "fuzzing found problems in: ${failed[*]}"
fi
log "fuzzing passed: ${targets[*]} (${secs}s each)"
