"""The white-box audit of every party mechanism as one table (BENCHMARKS.md).

    python bench/whitebox_table.py --runs psg:1:none,noise-halved dpsgd:1:all dpmerf:4:none \
        --canaries psg=16000,dpsgd=16000,dpdm=512,dpmerf=2000,gswgan=784

Each run ``METHOD:EPS:FAULTS`` (``all``: every fault) is ``python -m fedpsg.audit --method METHOD
--white-box --eps EPS --faults FAULTS`` at ``--profile`` (default cpu), into
``<out>/<method>-eps<eps>/``. Runs whose ``audit.json`` exists are not redone. Prints and writes
``<out>/table.md``: per fault, the claimed epsilon, both lower bounds, the scores' separation mu
and its lower limit beside the claim's mu, the verdict, the seconds, and for the correct mechanism
how many canaries would bring the Gaussian bound within a factor of 2 of the claim. The canaries
per method are capped by the values of one release (dpdm: 512 per class embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fedpsg.audit.cli import main as audit_main
from fedpsg.audit.whitebox import FAULTS
from fedpsg.runs.settings import format_epsilon


def table(out: Path) -> str:
    lines = [
        "| method | claimed eps | fault | SNJ bound | Gaussian bound | mu (lower) | claim's mu | verdict "
        "| canaries | seconds | canaries for eps/2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*/audit.json")):
        report = json.loads(path.read_text(), parse_constant=float)
        for run in report["runs"]:
            gaussian = run["gaussian"]
            needed = report.get("canaries_for_half_the_claim") if run["fault"] == "none" else ""
            lines.append(
                f"| {report['method']} | {format_epsilon(run['claimed_epsilon'])} | {run['fault']} "
                f"| {float(run['snj_lower_bound']):.2f} | {float(gaussian['epsilon_lower_bound']):.2f} "
                f"| {float(gaussian['mu']):.3f} ({float(gaussian['mu_lower']):.3f}) | {report['claimed_mu']:.3f} "
                f"| {run['verdict'].split(':')[0]} | {run['canaries']} | {run['seconds']:.0f} "
                f"| {'unreachable' if needed is None else needed} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="METHOD:EPS:FAULTS (FAULTS comma-separated or all)")
    parser.add_argument("--canaries", default="psg=16000,dpsgd=16000,dpdm=512,dpmerf=2000,gswgan=784")
    parser.add_argument("--dataset", default="fmnist")
    parser.add_argument("--classes", default="5,6")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/whitebox-table"))
    args = parser.parse_args()
    canaries = dict(item.split("=") for item in args.canaries.split(","))
    for run in args.runs:
        method, eps, faults = run.split(":")
        faults = ",".join(FAULTS) if faults == "all" else faults
        out = args.out / f"{method}-eps{eps}"
        if (out / "audit.json").exists():
            print(f"{out}: done, kept", flush=True)
            continue
        command = ["--method", method, "--white-box", "--eps", eps, "--faults", faults, "--dataset", args.dataset,
                   "--classes", args.classes, "--profile", args.profile, "--out", str(out),
                   "--canaries", canaries.get(method, "1000")]  # fmt: skip
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        print(f"load average {os.getloadavg()}: python -m fedpsg.audit {' '.join(command)}", flush=True)
        audit_main(command)
    text = table(args.out)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
