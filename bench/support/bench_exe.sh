#!/usr/bin/env bash
# Builds the named `cargo bench` target (release, the shared target directory) and prints
# the path of its executable: for scripts that run a bench binary under perf or valgrind.
#
#   exe=$(bench/support/bench_exe.sh dataflow)
set -euo pipefail
name="${1:?usage: bench/support/bench_exe.sh <bench name>}"
cargo bench --bench "$name" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
name = sys.argv[1]
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == name and m.get("executable"):
        print(m["executable"])' "$name"
