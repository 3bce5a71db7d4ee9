"""Run a command and sample the machine's CPU use from /proc/stat while it runs.

    python bench/cpu_use.py --out runs/fmnist-r3/cpu_use.csv -- \
        python -m fedpsg.simulate --scenario split_fmnist --eps 10 --repeats 3 --out runs/fmnist-r3

Writes one row per interval (busy share of all cores, user / system / nice shares, load
average) and prints the wall time and the whole run's average use. The shares are of the whole
machine: a process beside the command counts too, so measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> dict[str, int]:
    """The machine's cumulative CPU time per kind, in clock ticks (first line of /proc/stat)."""
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return dict(zip(FIELDS, map(int, values)))


def shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    delta = {k: after[k] - before[k] for k in FIELDS}
    total = sum(delta.values()) or 1
    idle = delta["idle"] + delta["iowait"]
    return {
        "busy": 1 - idle / total,
        "user": delta["user"] / total,
        "nice": delta["nice"] / total,
        "system": (delta["system"] + delta["irq"] + delta["softirq"]) / total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="CSV of the samples")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    start, first = time.monotonic(), cpu_times()
    process = subprocess.Popen(command)
    with args.out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "busy", "user", "nice", "system", "load1"])
        last = first
        while process.poll() is None:
            time.sleep(args.every)
            now = cpu_times()
            use = shares(last, now)
            writer.writerow([f"{time.monotonic() - start:.0f}", *(f"{use[k]:.3f}" for k in use), os.getloadavg()[0]])
            handle.flush()
            last = now
    whole = shares(first, cpu_times())
    wall = time.monotonic() - start
    print(
        f"wall {wall:.0f} s ({wall / 60:.1f} min); CPU busy {100 * whole['busy']:.1f}% of {os.cpu_count()} cores "
        f"(user {100 * whole['user']:.1f}%, nice {100 * whole['nice']:.1f}%, system {100 * whole['system']:.1f}%); "
        f"exit status {process.returncode}",
        flush=True,
    )
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
