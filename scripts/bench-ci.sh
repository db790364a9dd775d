#!/usr/bin/env bash
# The CI benchmark gate: the quick profile, tcp and tls only, 5 measured rounds, against the
# committed baseline of this host kind (benches/baseline/quick.json), failing when a ratio to tcp
# regressed by more than MAX_REGRESSION (default 30%: the quick profile's small guest is noisy,
# and its downtime, a few ms either way, too noisy to gate at all). Writes bench.json, bench.csv,
# runs.csv and bench.svg into BENCH_OUT (default bench-out/) as artefacts. Refresh the baseline:
#   qemu-tls-migrate bench --quick --modes tcp,tls --repeat 5 --out DIR
#   cp DIR/bench.json benches/baseline/quick.json
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked --quiet
exec ./target/release/qemu-tls-migrate bench --quick --modes tcp,tls --repeat 5 \
    --baseline benches/baseline/quick.json \
    --max-regression "${MAX_REGRESSION:-30%}" \
    --gate-metrics ram_mbps,total_ms,sent_ratio \
    --out "${BENCH_OUT:-bench-out}" "$@"
