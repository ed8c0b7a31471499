#!/usr/bin/env bash
# The whole test suite: unit tests, crate tests and whole-system tests that
# start real agents, QEMU and TLS on loopback. Each test starts what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Whole-system tests each run QEMUs under TCG; on a 2-core machine they are
# steadier one at a time.
cargo test --workspace --all-targets -- --test-threads=1 "$@"
