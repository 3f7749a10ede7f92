#!/usr/bin/env bash
# Profiles the dataflow bench: records `cargo bench --bench dataflow` (1 worker, SQLite
# store unless DATAFLOW_* say otherwise) with perf's DWARF call graphs, then prints where
# the timely workers' and the sink writer's samples go (bench/support/perf_shares.py).
#
#   bench/profile_dataflow.sh                  # record and report
#   PROFILE_DIR=/tmp/p bench/profile_dataflow.sh   # keep perf.data and the script there
#   PROFILE_FREQ=299 bench/profile_dataflow.sh     # samples per second (default 149)
#
# Needs `perf` (Debian's linux-perf; installed when missing). The sampling slows the run
# by a few percent; the shares, not the bench's clicks/s, are the figures of interest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/clickagg/target}"
export DATAFLOW_WORKERS="${DATAFLOW_WORKERS:-1}"
export DATAFLOW_STORES="${DATAFLOW_STORES:-sqlite}"
dir="${PROFILE_DIR:-$(mktemp -d -t clickagg-profile-XXXXXX)}"
freq="${PROFILE_FREQ:-149}"
mkdir -p "$dir"

if ! command -v perf >/dev/null; then
    apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null
fi

exe=$(bench/support/bench_exe.sh dataflow)
echo "profiling $exe (workers $DATAFLOW_WORKERS, store $DATAFLOW_STORES, $freq Hz) into $dir"
# The bench reads the workload relative to the package root, as cargo bench runs it.
perf record -F "$freq" --call-graph dwarf,16384 -o "$dir/perf.data" -- "$exe" --bench |
    tee "$dir/bench.txt"
perf script -i "$dir/perf.data" -F comm,tid,ip,sym 2>/dev/null >"$dir/perf.txt"
echo
echo "== timely workers"
bench/support/perf_shares.py --comm '^timely:work' <"$dir/perf.txt"
echo
echo "== sink writer"
bench/support/perf_shares.py --comm '^sink-writer' --top 15 <"$dir/perf.txt"
echo
echo "perf data and script in $dir"
