"""The empirical privacy audit of every registered method, as one table (BENCHMARKS.md).

    python bench/audit_table.py --dataset fmnist --classes 5,6 --eps 10 --canaries 200 --real 1000

Runs ``python -m fedpsg.audit --method M ...`` for each method (the private run and both positive
controls, at ``--profile``, default cpu), each into ``<out>/<method>/``, and prints a Markdown table:
claimed epsilon, the empirical lower bound of the private run and of each control, the audit's
verdict, and the memorisation of the private release (share of released images closer to training
than to test images, median distance ratio, near-copies). Prints the load average before and after
each method: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fedpsg.audit.cli import main as audit_main
from fedpsg.methods import method_names
from fedpsg.runs.settings import format_epsilon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--dataset", default="fmnist")
    parser.add_argument("--classes", default="5,6")
    parser.add_argument("--eps", default="10")
    parser.add_argument("--canaries", default="200")
    parser.add_argument("--real", default="1000")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/audit-table"))
    args = parser.parse_args()

    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = args.out / method
        load = os.getloadavg()[0]
        started = time.perf_counter()
        argv = ["--method", method, "--dataset", args.dataset, "--classes", args.classes, "--eps", args.eps,
                "--canaries", args.canaries, "--real", args.real, "--profile", args.profile,
                "--out", str(out)]  # fmt: skip
        if args.data_dir:
            argv += ["--data-dir", args.data_dir]
        audit_main(argv)
        report = json.loads((out / "audit.json").read_text())
        runs = {run["variant"]: run for run in report["runs"]}
        private = next((m for m in report["memorisation"] if m["stage"] == "private"), None)
        rows.append(
            [
                method,
                format_epsilon(float(runs["private"]["claimed_epsilon"])),
                *(f"{runs[v]['epsilon_lower_bound']:.2f}" for v in ("private", "non-private", "noise-removed")),
                report["verdict"].split(":")[0],
                f"{private['share_closer_to_train']:.2f}" if private else "-",
                f"{private['median_ratio']:.3f}" if private else "-",
                str(private["near_copies"]) if private else "-",
                f"{time.perf_counter() - started:.0f}",
                f"{load:.1f} -> {os.getloadavg()[0]:.1f}",
            ]
        )
    header = ["method", "claimed eps", "bound: private", "bound: non-private", "bound: noise removed", "verdict",
              "closer to train", "median ratio", "near-copies", "seconds", "load"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
