#!/usr/bin/env bash
# Runs every benchmark of the workspace and collects their figures.
# A benchmark prints lines `BENCH {"name", "value", "unit", "baseline"}`;
# this adds ratio and machine and writes target/bench/results.json.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
mkdir -p target/bench
raw=target/bench/raw.txt
: > "$raw"
# Benchmarks run one at a time so they do not compete for the two cores.
cargo bench --workspace --benches --no-run -q
cargo bench --workspace --benches -q 2>&1 | tee -a "$raw" | grep -v '^BENCH ' || true
python3 "$REPO_ROOT/e2e/bench_report.py" "$raw" target/bench/results.json
