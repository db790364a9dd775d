#!/usr/bin/env bash
# Sets up this machine (idempotent) and runs the whole test suite: unit tests, fake-peer QMP
# protocol tests, and integration tests against real QEMU 7.2 processes with real TLS; then the
# integration tests again on QEMU 10.0 (unpacked by setup.sh --qemu10 into .qemu/10.0, never
# installed), the libvirt and CloudStack-domain tests included: under QTM_QEMU their domains'
# <emulator> is a wrapper of it that the test libvirtds (the system's libvirt 9.0) list as their
# emulator (tests/integration/fixture/libvirt.rs). The cross-version tests (7.2 <-> 10.0) name
# both QEMUs themselves, so they run in the first pass only.
# Needs root: tests start QEMU with -runas / -run-with user=, and create network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --qemu10
# Port locks of the tests live apart from a real host's.
export QTM_LOCK_DIR="${QTM_LOCK_DIR:-$(mktemp -d -t qtm-locks-XXXXXX)}"
cargo build --all-targets --locked
# The criterion benches run once each, as a smoke check (timings are not asserted).
cargo test --locked --benches
t0=$(date +%s)
cargo test --locked --lib --bins --tests
t1=$(date +%s)
echo "test.sh: QEMU 7.2 pass took $((t1 - t0)) s"
QTM_QEMU="$PWD/.qemu/10.0/bin/qemu-system-x86_64" \
    cargo test --locked --test integration -- --skip cross_version:: --skip postcopy::
echo "test.sh: QEMU 10.0 pass took $(($(date +%s) - t1)) s"
