#!/usr/bin/env bash
# What CI checks, plus the lints: formatting, clippy with warnings as errors, the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
bash scripts/test.sh
