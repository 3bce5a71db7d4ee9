"""Run one party's method alone on some classes, and evaluate what it releases.

    python -m fedpsg.generate --method psg --dataset fmnist --classes 5,6 --eps 10 --spc 10 [--profile cpu]

Writes ``<out>/release.pt`` (the synthetic set, or the DP-trained model, with the privacy
record), ``<out>/synthetic.png`` for a set, and ``<out>/summary.json``; prints the accuracy on
the real test images of those classes (classifiers trained on the set, or the released model:
gen2real) and, for a set, the reversed utility (real2gen: classifiers trained on the evaluator's
real validation images of those classes, tested on the set).

The run is a release of the party's data like any other: checked against the policy and charged
to the lifetime ledger in ``--party-dir`` (default ``<party state dir>/local``) before it starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedpsg.budget.charge import charged_run
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import Refused, default_state_dir, load_policy
from fedpsg.data.datasets import DEFAULT_VALIDATION_PER_CLASS, DataNotFoundError, ImageSet, load_split
from fedpsg.data.synthetic import save_grid
from fedpsg.io.files import save_atomically, write_json
from fedpsg.methods import PartyStage, method_names
from fedpsg.nn.evaluation import (
    REAL_CLASSIFIERS,
    Evaluation,
    accuracy_by_group,
    evaluate_training_set,
    new_classifier,
    real_classifiers,
    reversed_utility,
)
from fedpsg.runs.cli import add_common_arguments, int_list, party_settings
from fedpsg.runs.settings import (
    format_epsilon,
)

log = logging.getLogger("fedpsg.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="psg", help=f"one of {', '.join(method_names())}")
    parser.add_argument("--dataset", default="fmnist", help="mnist or fmnist")
    parser.add_argument("--classes", type=int_list, default=None, help="comma-separated class ids (default: all)")
    add_common_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/generate-...)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    parser.add_argument(
        "--party-dir", type=Path, default=None, help="the party's folder: policy and lifetime ledger (default: local)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = party_settings(args, "generate")
    except ValueError as err:
        parser.error(str(err))
    method, spec, classes, config, evaluation = (
        settings.method, settings.spec, settings.classes, settings.config, settings.evaluation
    )  # fmt: skip
    epsilon, delta, device, profile = settings.epsilon, settings.delta, settings.device, settings.profile
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    default_out = f"generate-{method.name}-{spec.name}-{'-'.join(map(str, classes))}-eps{format_epsilon(epsilon)}"
    out = args.out or Path("runs") / default_out
    folder = args.party_dir or default_state_dir() / "local"
    what = f"generate {method.name} on classes {classes}"
    try:
        policy = load_policy(None, folder)
        policy.check_request(
            "this party", what, method=method.name, private=True, epsilon=epsilon, delta=delta, dataset=spec.name
        )
        policy.check_classes("this party", what, classes)
    except (ValueError, Refused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    try:
        # The party's images: the training split less the evaluator's validation hold-out, as in a run.
        splits = {
            split: load_split(
                spec.name, split, validation_per_class=DEFAULT_VALIDATION_PER_CLASS, data_dir=args.data_dir
            ).only_classes(classes)
            for split in ("private", "test")
        }
        train, test = splits["private"], splits["test"]
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s, profile %s on %s: %d private images of classes %s", method.name, profile, device, len(train), classes)

    started = time.perf_counter()
    stage = PartyStage(
        data=train,
        classes=classes,
        spec=spec,
        epsilon=epsilon,
        delta=delta,
        seed=args.seed,
        model=new_classifier(spec, evaluation, args.seed),
        device=device,
        label=f"{method.name} {spec.name} {classes}",
        data_dir=args.data_dir,
    )
    try:
        release = charged_run(method, stage, config, Ledger(folder, spec.name), policy, what)
    except Refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    generation_seconds = time.perf_counter() - started
    record = release.privacy
    save_atomically(
        {
            "images": release.images,
            "labels": release.labels,
            "model": release.model_state,
            "privacy": record.to_dict(),
            "config": {"method": method.name, **asdict(config)},
        },
        out / "release.pt",
    )
    if release.images is not None:
        save_grid(release.images, release.labels, spec.name, out / "synthetic.png")
    log.info(
        "spent epsilon=%.4f delta=%g (sigma=%.4f, %d steps at q=%.5f, %s) in %.0f s",
        record.epsilon, record.delta, record.noise_multiplier, record.steps, record.sample_rate,
        record.accountant, generation_seconds,
    )  # fmt: skip

    summary = {
        "method": method.name,
        "dataset": spec.name,
        "classes": classes,
        "profile": profile,
        "device": device,
        "privacy": record.to_dict(),
        "generation_seconds": generation_seconds,
        "config": asdict(config),
        "evaluation_config": asdict(evaluation),
    }
    if not args.no_eval:
        started = time.perf_counter()
        if release.images is not None:
            result = evaluate_training_set(
                ImageSet(release.images, release.labels), test, spec, evaluation, device=device, seed=args.seed
            )
        else:
            stage.model.load_state_dict(release.model_state)
            overall, _ = accuracy_by_group(stage.model, test, [], device)
            result = Evaluation([overall], [])
        summary.update(
            accuracy_mean=result.mean,
            accuracy_std=result.std,
            accuracies=result.accuracies,
            evaluation_seconds=time.perf_counter() - started,
        )
        print(
            f"accuracy on real test images of classes {classes}: "
            f"{100 * result.mean:.2f}% ± {100 * result.std:.2f} ({len(result.accuracies)} classifiers)"
        )
        if release.images is not None:
            synthetic = ImageSet(release.images, release.labels)
            real = load_split(
                spec.name, "validation", validation_per_class=DEFAULT_VALIDATION_PER_CLASS, data_dir=args.data_dir
            ).only_classes(classes)
            judges = real_classifiers(real, spec, REAL_CLASSIFIERS[profile], device, args.seed)
            real2gen = reversed_utility(synthetic, judges, device)
            summary.update(real2gen_mean=real2gen.mean, real2gen_std=real2gen.std, real2gen=real2gen.accuracies)
            print(
                f"real2gen, classifiers trained on {len(real)} real validation images, "
                f"tested on the set: {100 * real2gen.mean:.2f}% ± {100 * real2gen.std:.2f}"
            )
    write_json(out / "summary.json", summary)
    print(f"wrote {out}/release.pt, summary.json" + (", synthetic.png" if release.images is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
