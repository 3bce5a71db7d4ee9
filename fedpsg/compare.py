"""Read several continual runs of one scenario as one comparison.

    python -m fedpsg.compare runs/mnist-dpdm runs/mnist-psg --out runs/mnist-all

Each run is a folder written by ``fedpsg.simulate`` (with or without ``--repeats``). They must have
the same scenario, budget, profile and replay, their repetitions the same public seeds (the same
``--seed``), and no method may be in two of them. ``--out`` gets the joint outputs of one run with
repetitions: results.csv, statistics.csv, summary.json, report.md (paired differences at the last
stage, an ordering only where the interval excludes zero) and accuracy.png (confidence bands).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedpsg.runs.compare import compare_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of fedpsg.simulate")
    parser.add_argument("--out", type=Path, required=True, help="folder for the joint outputs")
    args = parser.parse_args(argv)
    if args.out.resolve() in {run.resolve() for run in args.runs}:
        parser.error("--out must not be one of the runs (their own outputs would be overwritten)")
    try:
        summary = compare_runs(args.runs, args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text(), end="")
    print(f"{len(summary['settings']['methods'])} methods over {summary['repeats']} repetitions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
