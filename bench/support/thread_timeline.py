#!/usr/bin/env python3
"""CPU of each thread of a running process, over time: whether a bench is bound by the
CPU of the machine or waits somewhere (barriers, a lone thread at the end).

    bench/support/thread_timeline.py PATTERN [STEP_S]

Waits for a process whose command line contains PATTERN (start it right after), then
prints every STEP_S seconds (0.25 by default) the cores each thread name used over that
step, read from /proc/<pid>/task/*/stat, until the process ends. A step whose figures sum
to the machine's cores is CPU-bound; one that sums to less waited. Example, beside the
dataflow bench:

    bench/support/thread_timeline.py /tmp/x/dataflow 0.05 > timeline.txt &
    DATAFLOW_WORKERS=2 DATAFLOW_STORES=sqlite /tmp/x/dataflow --bench

The kernel counts CPU in ticks of 10 ms, so a step of 50 ms shows each thread in fifths
of a core.
"""
import collections
import os
import sys
import time


def find(pattern):
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if pattern.encode() in cmd and b"thread_timeline" not in cmd:
            return pid
    return None


def threads(pid):
    """CPU ticks per (thread id, name)."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[(tid, name)] = int(fields[11]) + int(fields[12])
    return ticks


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    pattern = sys.argv[1]
    step = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
    hz = os.sysconf("SC_CLK_TCK")
    pid = None
    while pid is None:
        pid = find(pattern)
        time.sleep(0.01)
    start = time.time()
    last = {}
    while True:
        try:
            now = threads(pid)
        except OSError:
            break
        used = collections.Counter()
        for key, ticks in now.items():
            used[key[1]] += ticks - last.get(key, ticks if not last else 0)
        last = now
        parts = " ".join(f"{n}={t / hz / step:.2f}" for n, t in sorted(used.items()) if t > 0)
        total = sum(used.values()) / hz / step
        print(f"{time.time() - start:6.2f}s  all={total:.2f}  {parts}", flush=True)
        time.sleep(step)


if __name__ == "__main__":
    main()
