#!/usr/bin/env bash
# Counts the instructions of the dataflow bench under valgrind's callgrind, per thread
# kind (timely workers, sink writer, log readers): a figure that does not move with the
# machine's load or the host's steal, so two builds can be told apart by a few percent
# where their clicks/s, on these noisy VMs, cannot (bench/README.md, "Session 31").
#
#   bench/callgrind_dataflow.sh                        # 500k clicks, 1 worker, SQLite
#   DATAFLOW_CLICKS=1000000 bench/callgrind_dataflow.sh
#   CALLGRIND_EXE=/tmp/base/dataflow bench/callgrind_dataflow.sh   # another build's bench
#   CALLGRIND_DIR=/tmp/cg bench/callgrind_dataflow.sh  # keep the output files there
#
# Runs about 50 times slower than natively (500k clicks: about a minute), on one core:
# valgrind runs one thread at a time. The scheduling still decides how updates group into
# batches and commits, so the counts of one build vary a little from run to run (the
# sink writer's with its number of commits); the check against the truth runs in the
# main thread, counted apart.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/clickagg/target}"
export DATAFLOW_WORKERS="${DATAFLOW_WORKERS:-1}"
export DATAFLOW_STORES="${DATAFLOW_STORES:-sqlite}"
export DATAFLOW_CLICKS="${DATAFLOW_CLICKS:-500000}"
dir="${CALLGRIND_DIR:-$(mktemp -d -t clickagg-callgrind-XXXXXX)}"
mkdir -p "$dir"

if ! command -v valgrind >/dev/null; then
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi

exe="${CALLGRIND_EXE:-}"
if [ -z "$exe" ]; then
    exe=$(bench/support/bench_exe.sh dataflow)
fi
# Once natively first: it makes the workload of this size and imports it into the
# bench's cached log when they are missing, so that neither is in the counts.
echo "running $exe once natively first (workload and cached log)"
"$exe" --bench >/dev/null
echo "counting $exe (clicks $DATAFLOW_CLICKS, workers $DATAFLOW_WORKERS, store $DATAFLOW_STORES) into $dir"
rm -f "$dir"/callgrind.out.*
valgrind --tool=callgrind --separate-threads=yes --dump-instr=no \
    --callgrind-out-file="$dir/callgrind.out.%p" -- "$exe" --bench 2>"$dir/valgrind.txt" |
    tee "$dir/bench.txt"
echo
bench/support/callgrind_threads.py "$dir"/callgrind.out.*
echo
echo "callgrind output in $dir"
