#!/usr/bin/env bash
# Sets up this machine (idempotent), builds the tool, and runs the main job on a built-in
# default: a throwaway PKI, two local VMs, a live migration over QEMU-native TLS, the report.
# Extra arguments go to `qemu-tls-migrate demo` (try --help, --json, --transport tcp).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked --quiet
exec ./target/release/qemu-tls-migrate demo "$@"
