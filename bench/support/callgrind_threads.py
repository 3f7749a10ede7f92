#!/usr/bin/env python3
"""Instructions per thread kind, from callgrind's per-thread output files.

Reads the files `valgrind --tool=callgrind --separate-threads=yes` wrote for one run
(`<out>-01`, `<out>-02`, ...), tells each thread's kind by a function only that kind runs
(callgrind does not record thread names), and prints the instructions executed (Ir) per
kind and the functions with the most instructions of their own in the kinds asked for.

    bench/support/callgrind_threads.py /tmp/cg/callgrind.out.1234-*

Instruction counts do not depend on the machine's load or on the host stealing time, so
two builds' counts can be compared from one run each where their wall times cannot (see
`bench/callgrind_dataflow.sh`). They do depend on the scheduling of the threads, which
decides how updates group into batches and commits: run each build twice to see that
spread.
"""
import argparse
import collections
import os
import re
import subprocess
import sys

# A thread's kind, by a function only that kind of thread runs (callgrind's files name
# every function a thread entered, with or without instructions of its own). Order
# matters: the first match wins.
KINDS = [
    ("timely workers", re.compile(r"dataflow::dedup::")),
    ("sink writer", re.compile(r"spawn_writer::\{\{closure\}\}")),
    ("log readers", re.compile(r"dataflow::source::read_loop")),
    ("log writer", re.compile(r"log::embedded::\w*Writer\w*::run")),
]


def names(path):
    """Every function name the file defines (`fn=(id) name`, `cfn=(id) name`)."""
    out = set()
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("fn=(", "cfn=(")):
                _, _, name = line.partition(") ")
                if name:
                    out.add(name.strip())
    return out


def totals(path):
    """The file's total Ir, from its `totals:` (or `summary:`) line."""
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    return 0


def functions(path):
    """(self Ir, function name) of every function in the file, via callgrind_annotate."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        # "  12,345,678 (12.34%)  file:function [object]"
        m = re.match(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = m.group(2)
        name = re.sub(r"\s+\[[^\]]*\]$", "", name)
        name = name.split(":", 1)[1] if ":" in name and not name.startswith("0x") else name
        rows.append((int(m.group(1).replace(",", "")), name))
    return rows


def kind_of(path):
    defined = names(path)
    for kind, pattern in KINDS:
        if any(pattern.search(name) for name in defined):
            return kind
    return "other (main: start, checks)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=20, help="functions to list per kind")
    ap.add_argument(
        "--list",
        default="timely workers,sink writer",
        help="comma-separated kinds whose top functions to list",
    )
    args = ap.parse_args()
    by_kind = collections.Counter()
    threads = collections.Counter()
    self_ir = collections.defaultdict(collections.Counter)
    for path in args.files:
        # The file named without a thread suffix is left empty with --separate-threads.
        if os.path.getsize(path) == 0:
            continue
        rows = functions(path)
        kind = kind_of(path)
        by_kind[kind] += totals(path)
        threads[kind] += 1
        for ir, name in rows:
            self_ir[kind][name] += ir
    grand = sum(by_kind.values())
    print(f"instructions executed (Ir), {grand / 1e9:.3f} G in all:")
    for kind, ir in by_kind.most_common():
        print(f"  {kind:32} {ir / 1e9:8.3f} G  ({threads[kind]} threads)")
    for kind in [k.strip() for k in args.list.split(",") if k.strip()]:
        total = by_kind.get(kind, 0)
        if not total:
            continue
        print(f"\n{kind}: functions by their own Ir")
        for name, ir in self_ir[kind].most_common(args.top):
            print(f"  {100.0 * ir / total:5.1f}%  {ir / 1e6:9.1f} M  {name[:140]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
