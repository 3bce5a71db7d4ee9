"""Empirical privacy audit of what parties release.

    python -m fedpsg.audit RUN_DIR                       # memorisation report of a finished run
    python -m fedpsg.audit --method psg --dataset fmnist --classes 5,6 --eps 10 [--canaries 200]
    python -m fedpsg.audit --method psg --white-box --eps 1 [--canaries 1000] [--faults none,noise-halved]

A fresh audit reads the party's data: every run (the audited one and its controls) is charged to
the lifetime ledger in ``--party-dir`` (default ``<party state dir>/local``), the controls as
non-private runs.

The first form measures, for every released set of the run (``RUN_DIR/sets``), how close its
images are to the party's training images against equally many held-out test images
(:mod:`fedpsg.audit.memorisation`). The second runs one party's method with canaries and turns the
canaries' scores into an empirical lower bound on epsilon (:mod:`fedpsg.audit.canary`), next to
two positive controls (non-private, and noise removed) that show whether the audit can catch a
leak at all. The third (``--white-box``) audits the party's Gaussian mechanism itself with canaries
inserted at every noisy release (:mod:`fedpsg.audit.whitebox`), next to injected faults (noise
removed or halved, clipping removed, sampling at twice the rate) that it must catch.
All write ``audit.json``, ``audit.md`` and pictures (``--out``; default the sibling
``RUN_DIR.private-audit`` or ``runs/audit-...``). These hold raw training images and non-DP
distances, so never inside the run folder, whose contents are DP outputs and may be shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

from fedpsg.audit.canary import VARIANTS, AuditRun, mislabeled_canaries, run_audit, verdict
from fedpsg.audit.memorisation import measure_memorisation, save_nearest_pairs
from fedpsg.audit.whitebox import FAULTS, WhiteBoxRun, canaries_for, gdp_mu, run_white_box
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy, Refused, default_state_dir, load_policy
from fedpsg.data.datasets import (
    DataNotFoundError,
    ImageSet,
    dataset_spec,
    load_images,
    stage_classes,
)
from fedpsg.data.synthetic import SyntheticSet
from fedpsg.io.files import write_json, write_text_atomically
from fedpsg.methods import PartyStage, method_names
from fedpsg.nn.evaluation import new_classifier
from fedpsg.runs.cli import add_common_arguments, int_list, party_settings, positive_int
from fedpsg.runs.settings import (
    format_epsilon,
)

log = logging.getLogger("fedpsg.audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run folder: memorisation report of its sets")
    parser.add_argument("--method", default=None, help=f"audit a fresh party run of one of {', '.join(method_names())}")
    parser.add_argument("--dataset", default="fmnist", help="mnist or fmnist")
    parser.add_argument("--classes", type=int_list, default=[5, 6], help="the party's classes (default 5,6)")
    parser.add_argument(
        "--canaries", type=positive_int, default=None,
        help="canaries, each in w.p. 1/2 (default: 200 mislabelled images; white-box: 1000 Dirac canaries)",
    )  # fmt: skip
    parser.add_argument(
        "--white-box", action="store_true", help="audit the party's Gaussian mechanism with canaries inside it"
    )
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"white-box: comma-separated subset of {','.join(FAULTS)}"
    )
    parser.add_argument("--real", type=positive_int, default=None, help="use only N of the party's real images")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--party-dir", type=Path, default=None, help="the party's folder: policy and lifetime ledger (default: local)"
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="output folder, outside RUN_DIR (default RUN_DIR.private-audit or runs/audit-...); holds private data",
    )  # fmt: skip
    return parser


PRIVATE_MARKER = "README.txt"
PRIVATE_NOTICE = (
    "PRIVATE - DO NOT SHARE. This folder holds raw private training images (the nearest-neighbour\n"
    "pictures) and non-DP distances to them. Unlike a run folder, it is not DP output: keep it with\n"
    "the data's owner, and do not copy it into a run folder or publish it.\n"
)


# ----- RUN_DIR: memorisation of every released set ----------------------------------------------
def private_audit_dir(run_dir: Path) -> Path:
    """The default output of a run folder's audit: a sibling, since everything inside the run folder is DP output."""
    run_dir = run_dir.resolve()
    return run_dir.with_name(run_dir.name + ".private-audit")


def audit_run_folder(run_dir: Path, data_dir: str | None, out: Path) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    scenario = config["scenario"]
    spec = dataset_spec(scenario["dataset"])
    stages = stage_classes(scenario["class_order"], scenario["classes_per_stage"])
    train = load_images(spec.name, train=True, data_dir=data_dir)
    test = load_images(spec.name, train=False, data_dir=data_dir)
    rows = []
    for path in sorted((run_dir / "sets").glob("*/stage*.pt")):
        released = SyntheticSet.load(path)
        stage = int(path.stem.removeprefix("stage"))
        party_train = train.only_classes(stages[stage - 1])
        memorisation = measure_memorisation(released.as_image_set(), party_train, test, spec)
        picture = out / f"{path.parent.name}-stage{stage}-nearest.png"
        save_nearest_pairs(released.as_image_set(), memorisation, spec, picture)
        rows.append({"method": path.parent.name, "stage": stage, **memorisation.summary(), "picture": picture.name})
        log.info("%s stage %d: %s", path.parent.name, stage, rows[-1])
    if not rows:
        raise ValueError(f"{run_dir} holds no released sets (sets/<method>/stage<k>.pt)")
    report = {"run": str(run_dir), "dataset": spec.name, "memorisation": rows}
    _write(out, report, _memorisation_markdown(rows, f"Memorisation report: {run_dir}"))
    return report


def _memorisation_markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"# {title}", "",
        "Per released set: the share of released images closer to the party's training images than to",
        "equally many held-out test images of the same class (about 0.5 when nothing is memorised), the",
        "median ratio of those distances (about 1), and near-copies (closer to a training image than 99%",
        "of the test images are). `*-nearest.png`: released images (top) over their nearest training image.",
        "",
        "| method | stage | released | closer to train | median ratio | near-copies |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    lines += [
        f"| {r['method']} | {r['stage']} | {r['released']} | {r['share_closer_to_train']:.2f} "
        f"| {r['median_ratio']:.3f} | {r['near_copies']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


# ----- a fresh audited party run ---------------------------------------------------------------
BLACK_BOX_CANARIES = 200
WHITE_BOX_CANARIES = 1000


def _audited_party(
    args: argparse.Namespace, settings, generator: torch.Generator
) -> tuple[PartyPolicy, Ledger, ImageSet]:
    """The party's policy and ledger (the request checked first) and its images of ``--classes``
    (``--real`` of them, drawn with the auditor's public ``generator``)."""
    method, spec, epsilon, delta = settings.method, settings.spec, settings.epsilon, settings.delta
    folder = args.party_dir or default_state_dir() / "local"
    policy = load_policy(None, folder)
    what = f"audit of {method.name} on classes {args.classes}"
    policy.check_request("this party", what, method=method.name, private=True, epsilon=epsilon, delta=delta,
                         dataset=spec.name)  # fmt: skip
    policy.check_classes("this party", what, args.classes)
    train = load_images(spec.name, train=True, data_dir=args.data_dir).only_classes(args.classes)
    if args.real is not None and args.real < len(train):
        keep = torch.randperm(len(train), generator=generator)[: args.real]
        train = ImageSet(train.images[keep], train.labels[keep])
    return policy, Ledger(folder, spec.name), train


def audit_white_box(args: argparse.Namespace, out: Path) -> dict:
    """The party's Gaussian mechanism with white-box canaries, correct and with each fault."""
    settings = party_settings(args, "audit")
    method, spec, config, evaluation = settings.method, settings.spec, settings.config, settings.evaluation
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; available: {', '.join(FAULTS)}")
    if math.isinf(settings.epsilon):
        raise ValueError("a white-box audit needs a finite --eps: a non-private run has no mechanism to audit")
    policy, ledger, train = _audited_party(args, settings, torch.Generator().manual_seed(args.seed))
    stage = PartyStage(
        data=train, classes=args.classes, spec=spec, epsilon=settings.epsilon, delta=settings.delta, seed=args.seed,
        model=new_classifier(spec, evaluation, args.seed), device=settings.device,
        label=f"audit {method.name} {spec.name} {args.classes}",
    )  # fmt: skip
    count = args.canaries or WHITE_BOX_CANARIES
    runs: list[WhiteBoxRun] = []
    for fault in faults:
        runs.append(run_white_box(method, config, stage, count, ledger, policy, fault, seed=args.seed))
        log.info("%s: %s (%.0f s)", fault, runs[-1].verdict(), runs[-1].seconds)
    claimed_mu = gdp_mu(settings.epsilon, settings.delta)
    report = {
        "method": method.name,
        "dataset": spec.name,
        "classes": args.classes,
        "profile": settings.profile,
        "epsilon": settings.epsilon,
        "delta": settings.delta,
        "real_images": len(train),
        "canaries": count,
        "canary_kind": "Dirac: one coordinate of every Gaussian release, at 4x the declared bound before clipping",
        "claimed_mu": claimed_mu,
        "runs": [run.to_dict() for run in runs],
    }
    correct = next((run for run in runs if run.fault == "none"), None)
    if correct is not None:
        # Within a factor of 2 of the claim: epsilon/2 as a Gaussian-DP separation.
        report["canaries_for_half_the_claim"] = canaries_for(
            correct.gaussian["mu"], gdp_mu(settings.epsilon / 2, settings.delta)
        )
    _write(out, report, _white_box_markdown(report))
    # Every canary's score, membership and releases, to recompute or plot the bounds.
    scores = {run.fault: {"scores": run.scores, "included": run.included, "observed": run.observed} for run in runs}
    torch.save(scores, out / "scores.pt")
    return report


def _white_box_markdown(report: dict) -> str:
    lines = [
        f"# White-box audit: {report['method']} on {report['dataset']} classes {report['classes']}",
        "",
        f"{report['real_images']} real images, {report['canaries']} canaries ({report['canary_kind']}), each in "
        "w.p. 1/2. Lower bounds at 97.5% each (95% for a verdict on either): Steinke-Nasr-Jagielski "
        "(rigorous) and Gaussian (the two score distributions as Gaussians; claimed epsilon as a "
        f"Gaussian-DP mu: {report['claimed_mu']:.3f}). n/a: the fault changes nothing in this mechanism.",
        "",
        "| fault | claimed epsilon | SNJ bound | Gaussian bound | mu (lower limit) | releases | verdict | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        gaussian = run["gaussian"]
        lines.append(
            f"| {run['fault']} | {format_epsilon(run['claimed_epsilon'])} | {run['snj_lower_bound']:.2f} "
            f"| {gaussian['epsilon_lower_bound']:.2f} | {gaussian['mu']:.3f} ({gaussian['mu_lower']:.3f}) "
            f"| {run['releases_observed']} | {run['verdict'].split(':')[0]} | {run['seconds']:.0f} |"
        )
    needed = report.get("canaries_for_half_the_claim", "absent")
    if needed != "absent":
        answer = f"about {needed}" if needed else "none suffice (the scores' separation itself is below it)"
        lines += ["", f"Canaries for a Gaussian bound within a factor of 2 of the claim: {answer}"]
    return "\n".join(lines) + "\n"


def audit_fresh_run(args: argparse.Namespace, out: Path) -> dict:
    settings = party_settings(args, "audit")
    method, spec, config, evaluation = settings.method, settings.spec, settings.config, settings.evaluation
    epsilon, delta, device, profile = settings.epsilon, settings.delta, settings.device, settings.profile
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; available: {', '.join(VARIANTS)}")

    # The auditor's randomness (which canaries, which are in, which real images) is public: the
    # party's DP randomness stays its own secret inside method.run.
    generator = torch.Generator().manual_seed(args.seed)
    # The audited runs read the party's data: each is charged to its lifetime ledger, checked first.
    policy, ledger, train = _audited_party(args, settings, generator)
    test = load_images(spec.name, train=False, data_dir=args.data_dir)
    canaries = mislabeled_canaries(test, args.classes, args.canaries or BLACK_BOX_CANARIES, generator)
    stage = PartyStage(
        data=train, classes=args.classes, spec=spec, epsilon=epsilon, delta=delta, seed=args.seed,
        model=new_classifier(spec, evaluation, args.seed), device=device,
        label=f"audit {method.name} {spec.name} {args.classes}",
    )  # fmt: skip
    log.info(
        "auditing %s (profile %s) on %d real images of %s + %d of %d canaries, eps=%s",
        method.name, profile, len(train), args.classes, int(canaries.included.sum()), len(canaries),
        format_epsilon(epsilon),
    )  # fmt: skip
    runs: list[AuditRun] = []
    for variant in variants:
        runs.append(run_audit(method, config, stage, canaries, evaluation, ledger, policy, variant))
        log.info(
            "%s: empirical epsilon >= %.3f (%.0f s)", variant, runs[-1].bound["epsilon_lower_bound"], runs[-1].seconds
        )

    memorisation = []
    for run in runs:
        if run.release.images is None:
            continue
        released = ImageSet(run.release.images, run.release.labels)
        measured = measure_memorisation(released, train, test.only_classes(args.classes), spec, args.seed)
        picture = out / f"{run.variant}-nearest.png"
        save_nearest_pairs(released, measured, spec, picture)
        memorisation.append(
            {"method": method.name, "stage": run.variant, **measured.summary(), "picture": picture.name}
        )

    report = {
        "method": method.name,
        "dataset": spec.name,
        "classes": args.classes,
        "profile": profile,
        "epsilon": epsilon,
        "delta": delta,
        "real_images": len(train),
        "canaries": len(canaries),
        "canaries_included": int(canaries.included.sum()),
        "canary_kind": "held-out test images of other classes, labelled with a random class of the party",
        "verdict": verdict(runs),
        "runs": [run.to_dict() for run in runs],
        "memorisation": memorisation,
    }
    _write(out, report, _canary_markdown(report) + "\n" + _memorisation_markdown(memorisation, "Memorisation"))
    return report


def _canary_markdown(report: dict) -> str:
    lines = [
        f"# Canary audit: {report['method']} on {report['dataset']} classes {report['classes']}",
        "",
        f"{report['real_images']} real images, {report['canaries_included']} of {report['canaries']} canaries "
        f"included ({report['canary_kind']}). Lower bounds hold at 95% confidence (Steinke, Nasr & "
        "Jagielski 2023), over both scores and all numbers of guesses (Bonferroni).",
        "",
        f"**Verdict: {report['verdict']}**",
        "",
        "| run | claimed epsilon | empirical lower bound | best score | guesses | correct | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        best = run["best"]
        lines.append(
            f"| {run['variant']} | {format_epsilon(run['claimed_epsilon'])} | {run['epsilon_lower_bound']:.2f} "
            f"| {best['score']} | {best['guesses']} | {best['correct']} | {run['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, report: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / PRIVATE_MARKER, PRIVATE_NOTICE)
    write_json(out / "audit.json", report)
    write_text_atomically(out / "audit.md", markdown)
    print(markdown)
    print(f"wrote {out}/audit.json, audit.md and pictures")
    print(f"PRIVATE: {out} holds raw training images and non-DP distances; do not share it (see {PRIVATE_MARKER})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.method is None):
        parser.error("give either RUN_DIR (a finished run) or --method (a fresh audited run)")
    if args.run_dir is not None and not (args.run_dir / "config.json").exists():
        parser.error(f"{args.run_dir} is not a run folder (no config.json)")
    if args.run_dir is not None and args.out is not None and args.out.resolve().is_relative_to(args.run_dir.resolve()):
        parser.error(f"--out {args.out} is inside the run folder, whose contents count as DP output: choose another")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.run_dir is not None:
            audit_run_folder(args.run_dir, args.data_dir, args.out or private_audit_dir(args.run_dir))
        elif args.white_box:
            epsilon = (args.eps or [10.0])[0]
            name = f"audit-white-box-{args.method}-{args.dataset}-eps{format_epsilon(epsilon)}"
            report = audit_white_box(args, args.out or Path("runs") / name)
            correct = [run for run in report["runs"] if run["fault"] == "none"]
            return 1 if any(run["verdict"].startswith("VIOLATION") for run in correct) else 0
        else:
            epsilon = (args.eps or [10.0])[0]
            name = f"audit-{args.method}-{args.dataset}-eps{format_epsilon(epsilon)}"
            report = audit_fresh_run(args, args.out or Path("runs") / name)
            return 0 if not report["verdict"].startswith("VIOLATION") else 1
    except (DataNotFoundError, Refused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
