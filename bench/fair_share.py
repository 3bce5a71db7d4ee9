"""How much a simulation slows beside one busy process: alone, then beside a one-core busy loop.

    python bench/fair_share.py -- python -m fedpsg.simulate --scenario split_fmnist --profile tiny \
        --stages 2 --methods dpmerf,dpdm --out runs/fair-share

Runs the command twice (the second time with a fresh ``--out`` suffix ``-beside``, so that it
does not resume the first), the second time beside a pure-Python busy loop at the driver's own
priority, and prints both wall times and their ratio. On ``c`` cores a command that keeps them
all busy should slow by about ``(c + 1) / c`` (the loop takes its fair share, one core of
``c + 1`` runnable threads); parties at a lower priority than the loop would starve instead (Ray
starts workers at nice 15 unless told otherwise). Measure on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

BUSY_LOOP = "while True: pass"


def timed_run(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def with_out_suffix(command: list[str], suffix: str) -> list[str]:
    """``command`` with ``suffix`` appended to its ``--out`` value (it must have one)."""
    if "--out" not in command[:-1]:
        raise SystemExit("the command needs an --out folder (each run writes its own)")
    at = command.index("--out") + 1
    return command[:at] + [command[at] + suffix] + command[at + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to time")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to time after --")
    cores = os.cpu_count() or 1
    print(f"{cores} cores; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    alone = timed_run(with_out_suffix(command, "-alone"))
    print(f"alone: {alone:.0f} s wall; load average {os.getloadavg()[0]:.2f}", flush=True)
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        beside = timed_run(with_out_suffix(command, "-beside"))
    finally:
        busy.kill()
        busy.wait()
    print(
        f"beside one busy process: {beside:.0f} s wall, {beside / alone:.2f}x alone "
        f"(a fair share on {cores} cores: about {(cores + 1) / cores:.2f}x)",
        flush=True,
    )


if __name__ == "__main__":
    main()
