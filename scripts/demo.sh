#!/usr/bin/env bash
# The demo: a CA, two hosts, the test guest migrated live and securely, checked.
# Usage: scripts/demo.sh [--json] [other `ferry demo` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --quiet --bin ferry
exec ./target/release/ferry demo "$@"
