#!/usr/bin/env bash
# The whole test suite: unit tests, crate tests and whole-system tests that
# start real agents, QEMU, swtpm and TLS on loopback (each test starts what it
# needs), then a short cargo-fuzz run of the decoder targets.
#   FERRY_SKIP_FUZZ=1 scripts/test.sh    # without the fuzz run
#   scripts/fuzz.sh 60                   # every fuzz target, longer, with ASan
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Whole-system tests each run QEMUs under TCG; on a 2-core machine they are
# steadier one at a time.
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=1 "$@"
if [ "${FERRY_SKIP_FUZZ:-0}" != 1 ]; then
  # The decoders whose fuzz build is light (the agent's own decoders are
  # also fuzzed by crates/ferry-agent/tests/decoders.rs above).
  FUZZ_TARGETS="frame frame_reader guest_line vm_spec qmp_reply" FUZZ_SANITIZER=none bash scripts/fuzz.sh 5
fi
