"""Fed-GS-WGAN and FedAvg-GAN: accuracy, wall time and bytes per round, for BENCHMARKS.md.

    python bench/fed_gan_table.py --out runs/fed-gan-bench            # the default runs below
    python bench/fed_gan_table.py --out runs/fed-gan-bench --runs 'fed_gswgan_mnist --eps 10'

Each run is ``python -m fedpsg.simulate --scenario ...`` (a real Flower simulation on Ray) into
its own folder under ``--out`` (re-running resumes/skips finished runs); the table is read back
from each run's summary.json. Run it on a quiet machine: it prints the load average per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RUNS = [
    "fed_gswgan_mnist --eps 10",
    "fed_gswgan_mnist --eps 1000 --methods fed-gswgan",
    "fed_gswgan_mnist --eps inf --methods fed-gswgan",
    "fed_gswgan_fmnist --eps 10",
    "fed_gswgan_mnist --eps 10 --parties 50 --split by-class --methods fed-gswgan --set gan.parties_per_round=10",
]
# Centralized GS-WGAN at eps = 10 (the paper, Table 2: CNN accuracy on real test images).
PAPER = {"mnist": 0.80, "fmnist": 0.65}


def folder_name(run: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run.replace("--", "").replace(" ", "-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fed-gan-bench"))
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="'SCENARIO simulate-flags...' per run")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        scenario, *flags = shlex.split(run)
        out = args.out / folder_name(run)
        command = [sys.executable, "-m", "fedpsg.simulate", "--scenario", scenario, *flags, "--out", str(out)]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        load = os.getloadavg()[0]
        started = time.perf_counter()
        if not (out / "DONE").exists():
            print(f"$ {shlex.join(command)}   (load {load:.2f})", flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((out / "summary.json").read_text())
        dataset = summary["settings"]["scenario"]["dataset"]
        for method, final in summary["final"].items():
            per_round = summary["bytes_per_round_per_party"][method]
            rows.append(
                {
                    "run": run,
                    "method": method,
                    "accuracy": final["accuracy"],
                    "eps per party": final["epsilon"],
                    "rounds": int(final["round"]),
                    "method seconds": summary["wall_seconds"][method],
                    "bytes up / party / round": per_round["up"],
                    "bytes down / party / round": per_round["down"],
                    "paper (centralized, eps 10)": PAPER.get(dataset),
                }
            )
        print(f"  done in {wall:.0f} s (load before {load:.2f})", flush=True)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
