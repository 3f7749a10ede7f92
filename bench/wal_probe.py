#!/usr/bin/env python3
"""Samples a SQLite WAL's index (the `-shm` file) and prints, per wall-clock second, how
long the WAL was and how far checkpoints had copied it.

Why: a WAL restarts from its first frame only when a checkpoint has copied all of it and
no reader still reads it; until then it grows, and the checkpoint that finally copies it
does so in one go. This shows whether the embedded log's WAL stays near SQLite's 1,000
page auto-checkpoint or runs long while readers (the dataflow's source, the archiver)
hold snapshots.

    python3 bench/wal_probe.py --secs 60 [--shm PATH | --pid PID]

Without --shm it follows the newest `log.db-shm` that process PID (or any process) has
open, looking again every second (a bench may start a server per phase). Fields read
(sqlite.org/walformat.html, in the machine's native byte order): the index header's
mxFrame (offset 16) and the checkpoint info's nBackfill (offset 96).
"""

import argparse
import glob
import os
import struct
import time


def find_shm(pid):
    pids = [pid] if pid else [p for p in os.listdir("/proc") if p.isdigit()]
    found = []
    for p in pids:
        for fd in glob.glob(f"/proc/{p}/fd/*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith("log.db-wal") or target.endswith("log.db-shm"):
                shm = target[: -len("-wal")] + "-shm" if target.endswith("-wal") else target
                if os.path.exists(shm):
                    found.append(shm)
    if not found:
        return None
    return max(found, key=os.path.getmtime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=float, default=60)
    ap.add_argument("--shm")
    ap.add_argument("--pid")
    ap.add_argument("--every-ms", type=float, default=2)
    a = ap.parse_args()
    deadline = time.time() + a.secs
    shm = a.shm
    last = None
    while shm is None and time.time() < deadline:
        shm = find_shm(a.pid)
        if shm is None:
            time.sleep(0.2)
    if shm is None:
        print("wal_probe: no log.db-shm found")
        return
    if not os.path.exists(shm):
        raise SystemExit(f"wal_probe: {shm} does not exist")
    print(f"wal_probe: {shm}")
    print("unix_s  max_frames  max_uncopied  restarts  samples")
    fd = os.open(shm, os.O_RDONLY)
    second = int(time.time())
    max_frames = max_uncopied = restarts = samples = 0
    while time.time() < deadline:
        # pread, not a buffered read: a buffered file object would answer a seek back
        # to 0 from its own stale buffer.
        head = os.pread(fd, 136, 0)
        if len(head) >= 100:
            mx_frame = struct.unpack_from("=I", head, 16)[0]
            backfill = struct.unpack_from("=I", head, 96)[0]
            max_frames = max(max_frames, mx_frame)
            max_uncopied = max(max_uncopied, mx_frame - min(backfill, mx_frame))
            if last is not None and mx_frame < last:
                restarts += 1
            last = mx_frame
            samples += 1
        now = int(time.time())
        if now != second:
            print(f"{second}  {max_frames:10d}  {max_uncopied:12d}  {restarts:8d}  {samples:7d}", flush=True)
            second = now
            max_frames = max_uncopied = restarts = samples = 0
            # A bench may start a new server per phase: follow the newest log unless told.
            if a.shm is None:
                newest = find_shm(a.pid)
                if newest is not None and newest != shm:
                    shm, last = newest, None
                    os.close(fd)
                    fd = os.open(shm, os.O_RDONLY)
                    print(f"wal_probe: now {shm}", flush=True)
        time.sleep(a.every_ms / 1000)


if __name__ == "__main__":
    main()
