#!/usr/bin/env python3
"""Stall probe: does the machine itself pause, whatever our processes do?

Wakes every millisecond at real-time priority and prints, per wall-clock second, the
longest gap between two wake-ups beyond the millisecond it asked for, and the CPU time
the hypervisor stole from this VM in that second (/proc/stat's `steal`). Run it beside
a benchmark and lay its seconds beside the benchmark's worst latency per second: a
stall the probe also sees, at a priority that preempts every process of ours, is the
machine's (host preemption, the VM's own interrupts), not the server's.

    chrt -f 50 python3 bench/stall_probe.py --secs 60 > /tmp/probe.txt

Output: a header, then one line per second:
    <unix second> max_gap_ms=<ms> steal_ms=<ms> io_full_ms=<ms> cpu_some_ms=<ms> wakeups=<n>
where io_full_ms and cpu_some_ms are the kernel's pressure stall times in that second
(/proc/pressure: every runnable task waiting on I/O; some task waiting for a core).
"""
import argparse
import os
import sys
import time


def steal_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    return int(fields[8])


def pressure_us(resource: str, kind: str) -> int:
    """The `total=` stall time in µs of a /proc/pressure line, 0 without PSI."""
    try:
        with open(f"/proc/pressure/{resource}") as f:
            for line in f:
                if line.startswith(kind):
                    return int(line.rsplit("total=", 1)[1])
    except OSError:
        pass
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=float, default=60.0)
    ap.add_argument("--interval-ms", type=float, default=1.0)
    args = ap.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    interval = args.interval_ms / 1000.0
    try:
        policy = os.sched_getscheduler(0)
    except OSError:
        policy = -1
    print(
        f"# stall probe: interval {args.interval_ms} ms, scheduler policy {policy} "
        f"(1 = SCHED_FIFO), {os.cpu_count()} cpus",
        flush=True,
    )
    end = time.monotonic() + args.secs
    second = int(time.time())
    steal_start = steal_jiffies()
    io_start, cpu_start = pressure_us("io", "full"), pressure_us("cpu", "some")
    max_gap = 0.0
    wakeups = 0
    last = time.monotonic()
    while last < end:
        time.sleep(interval)
        now = time.monotonic()
        gap = now - last - interval
        max_gap = max(max_gap, gap)
        wakeups += 1
        last = now
        wall = int(time.time())
        if wall != second:
            steal = steal_jiffies()
            io, cpu = pressure_us("io", "full"), pressure_us("cpu", "some")
            print(
                f"{second} max_gap_ms={max_gap * 1000:.1f} "
                f"steal_ms={(steal - steal_start) * 1000 / hz:.0f} "
                f"io_full_ms={(io - io_start) / 1000:.0f} cpu_some_ms={(cpu - cpu_start) / 1000:.0f} "
                f"wakeups={wakeups}",
                flush=True,
            )
            second, steal_start, max_gap, wakeups = wall, steal, 0.0, 0
            io_start, cpu_start = io, cpu
    return 0


if __name__ == "__main__":
    sys.exit(main())
