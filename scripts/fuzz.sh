#!/usr/bin/env bash
# Build every cargo-fuzz target in fuzz/, then run each for SECONDS
# (default 10). Every target is built even when only some run, so a target
# that no longer compiles against the decoder it fuzzes fails every run.
#
#   scripts/fuzz.sh            # 10 s per target
#   scripts/fuzz.sh 300        # a longer campaign
#   FUZZ_TARGETS="frame vm_spec" scripts/fuzz.sh 60   # run only these
#   FUZZ_SANITIZER=none scripts/fuzz.sh   # faster build, no ASan
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer, -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP=1 lets this stable toolchain accept them. Only this script
# sets it, only for the fuzz build (fuzz/ is its own workspace, target dir
# fuzz/target), so the main build stays plain stable.
#
# New inputs go to fuzz/work/<target> (git-ignored); the committed seeds in
# fuzz/corpus/<target> are read, never written. A crash leaves its input in
# fuzz/artifacts/<target>/ and this script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${1:-10}"
SANITIZER="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    start=$(date +%s)
    cargo install cargo-fuzz --locked
    echo "fuzz.sh: cargo-fuzz installed in $(( $(date +%s) - start )) s" >&2
fi

all=$(cargo fuzz list)
targets="${FUZZ_TARGETS:-$all}"
for t in $targets; do
    grep -qx "$t" <<<"$all" || { echo "fuzz.sh: no fuzz target $t (have: $(echo $all))" >&2; exit 2; }
done
start=$(date +%s)
cargo fuzz build --sanitizer "$SANITIZER"
echo "fuzz.sh: built all $(echo $all | wc -w) targets in $(( $(date +%s) - start )) s" >&2

failed=()
for t in $targets; do
    mkdir -p "work/$t" "corpus/$t"
    echo "fuzz.sh: $t for ${SECONDS_PER_TARGET} s" >&2
    if ! cargo fuzz run --sanitizer "$SANITIZER" "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=70000 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2> "work/$t.log"; then
        failed+=("$t")
        tail -40 "work/$t.log" >&2
    else
        grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^Done" "work/$t.log" | tr '\n' ' ' >&2 || true
        echo >&2
    fi
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz.sh: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: all targets ran ${SECONDS_PER_TARGET} s without a finding" >&2
