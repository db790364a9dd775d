#!/usr/bin/env bash
# Sets up this machine (idempotent) and runs the whole test suite: unit tests, fake-peer QMP
# protocol tests, and integration tests against real QEMU 7.2 processes with real TLS.
# Needs root: tests start QEMU with -runas, and create network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --qemu10
# Port locks of the tests live apart from a real host's.
export QTM_LOCK_DIR="${QTM_LOCK_DIR:-$(mktemp -d -t qtm-locks-XXXXXX)}"
cargo build --all-targets --locked
# The criterion benches run once each, as a smoke check (timings are not asserted).
cargo test --locked --benches
cargo test --locked --lib --bins --tests
