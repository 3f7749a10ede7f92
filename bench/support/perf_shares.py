#!/usr/bin/env python3
"""Where a thread's time goes, by part of the dataflow, from `perf script` output.

Reads the text of `perf script -F comm,tid,ip,sym` over a recording made with call
graphs (`perf record --call-graph dwarf`), keeps the samples of the threads whose name
matches --comm, and prints, for each part below, the share of those samples whose stack
holds a frame matching the part's pattern (inclusive: a sample can count for several
parts, e.g. a page fault inside the dedup), then the hottest leaf symbols. Frames are
matched by their demangled names, generic parameters included, so a part is only as
sharp as its pattern: check a surprising share against the stacks themselves.

    perf script -i perf.data -F comm,tid,ip,sym | bench/support/perf_shares.py --comm 'timely:work'

`bench/profile_dataflow.sh` records the dataflow bench and runs this.
"""
import argparse
import collections
import re
import sys

# Parts of a worker's time, by a pattern over one frame's symbol. Order is the report's.
PARTS = [
    ("source (log reader, decode)", r"dataflow::source::"),
    ("dedup", r"dataflow::dedup::first_clicks"),
    ("fraud join (dedup winners x flags)", r"classify_on_time"),
    ("IP-burst rule", r"dataflow::bursts::"),
    ("counts in place", r"dataflow::count::"),
    ("distinct users in place", r"dataflow::distinct::"),
    ("catalog join in place", r"dataflow::lookup::"),
    ("arrange (batchers, builders, merges)", r"differential_dataflow::(operators::arrange|trace::implementations|batcher)"),
    ("join (differential)", r"differential_dataflow::operators::join"),
    ("reduce (differential)", r"differential_dataflow::operators::reduce"),
    ("view rows (dataflows/*.rs closures)", r"dataflows::\w+::build::\{closure"),
    ("sink operator", r"dataflow::sink::click_sink"),
    ("growing hash tables (rehash)", r"^reserve_rehash"),
    ("page faults", r"asm_exc_page_fault|exc_page_fault"),
    ("allocator (jemalloc)", r"_rjem_|je_"),
    ("memcpy / memmove", r"__memmove|__memcpy"),
]


def samples(lines, comm_re):
    """Yields (comm, [frame symbols, leaf first]) for each sample of a matching thread."""
    comm, frames = None, []
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            if comm is not None and comm_re.search(comm):
                yield comm, frames
            comm, frames = None, []
            continue
        if not line[0].isspace():
            # Header: "<comm> <tid> ..." (the comm may hold spaces; the tid is numeric).
            m = re.match(r"^(.*?)\s+(\d+)(?:/\d+)?\s", line + " ")
            comm = m.group(1) if m else line.split()[0]
            frames = []
        else:
            parts = line.strip().split(None, 1)
            sym = parts[1] if len(parts) > 1 else "?"
            sym = re.sub(r"\s+\([^)]*\)$", "", sym)  # drop "(dso)"
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            frames.append(sym)
    if comm is not None and comm_re.search(comm):
        yield comm, frames


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comm", default="timely:work", help="regex over thread names")
    ap.add_argument("--top", type=int, default=25, help="leaf symbols to list")
    args = ap.parse_args()
    comm_re = re.compile(args.comm)
    parts = [(name, re.compile(p)) for name, p in PARTS]
    total = 0
    by_part = collections.Counter()
    leaves = collections.Counter()
    threads = collections.Counter()
    for comm, frames in samples(sys.stdin, comm_re):
        total += 1
        threads[comm] += 1
        if frames:
            leaves[frames[0]] += 1
        for name, pat in parts:
            if any(pat.search(f) for f in frames):
                by_part[name] += 1
    if total == 0:
        print(f"no samples of threads matching {args.comm!r}", file=sys.stderr)
        return 1
    print(f"{total} samples of {', '.join(f'{c} ({n})' for c, n in threads.most_common())}")
    print("share of samples whose stack holds the part (inclusive):")
    for name, _ in PARTS:
        print(f"  {100.0 * by_part[name] / total:5.1f}%  {name}")
    print(f"hottest leaf symbols (self):")
    for sym, n in leaves.most_common(args.top):
        print(f"  {100.0 * n / total:5.1f}%  {sym[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
