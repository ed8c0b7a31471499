#!/usr/bin/env bash
# The whole test suite: the house rules (formatting, lints), unit, crate and
# whole-system tests that start real agents, QEMU, swtpm and TLS on loopback
# (each test starts what it needs), then every cargo-fuzz target built and a
# short run of the decoder targets.
#   FERRY_SKIP_FUZZ=1 scripts/test.sh    # without the fuzz build and run
#   scripts/fuzz.sh 60                   # every fuzz target, longer, with ASan
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --version >/dev/null 2>&1 || { echo "test.sh: needs rustfmt (rustup component add rustfmt)" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "test.sh: needs clippy (rustup component add clippy)" >&2; exit 1; }
# House rules that hold themselves: a style or lint slip fails here, before
# the long tests. fuzz/ is a workspace of its own.
cargo fmt --all --check
cargo fmt --all --check --manifest-path fuzz/Cargo.toml
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Whole-system tests each run QEMUs under TCG; on a 2-core machine they are
# steadier one at a time.
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=1 "$@"
if [ "${FERRY_SKIP_FUZZ:-0}" != 1 ]; then
  # fuzz.sh builds every target (a target that no longer compiles fails
  # here) and runs these light ones briefly; the agent's own decoders are
  # also fuzzed by crates/ferry-agent/tests/decoders.rs above.
  FUZZ_TARGETS="frame frame_reader guest_line vm_spec qmp_reply" FUZZ_SANITIZER=none bash scripts/fuzz.sh 5
fi
