"""Generate one party's DP synthetic set with PSG and evaluate it.

    python -m fedpsg.generate --dataset fmnist --classes 5,6 --eps 10 --spc 10 [--profile cpu]

Writes ``<out>/synthetic.pt`` (images, labels and the privacy record), ``<out>/synthetic.png``
and ``<out>/summary.json``; prints the evaluation accuracy on the real test images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedpsg.cli import (
    add_profile_overrides,
    format_epsilon,
    int_list,
    open_unit_float,
    positive_float_or_inf,
    positive_int,
    profile_overrides,
)
from fedpsg.data import DATA_DIR_ENV, DataNotFoundError, dataset_spec, load_images, validate_classes
from fedpsg.evaluation import evaluate_training_set
from fedpsg.profiles import PROFILES, default_device, get_profile, with_overrides
from fedpsg.psg import generate_private_set
from fedpsg.synthetic import save_grid

log = logging.getLogger("fedpsg.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fmnist", help="mnist or fmnist")
    parser.add_argument("--classes", type=int_list, default=None, help="comma-separated class ids (default: all)")
    parser.add_argument("--eps", type=positive_float_or_inf, default=10.0, help="target epsilon ('inf' = non-private)")
    parser.add_argument("--delta", type=open_unit_float, default=1e-5)
    parser.add_argument("--spc", type=positive_int, default=None, help="synthetic samples per class")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default: paper on CUDA, else cpu")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help=f"dataset root (default: ${DATA_DIR_ENV}, then download)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/generate-...)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    add_profile_overrides(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = dataset_spec(args.dataset)
        classes = args.classes if args.classes is not None else list(range(spec.num_classes))
        validate_classes(classes, spec.num_classes)
        device = args.device or default_device()
        overrides = profile_overrides(args)
        profile = with_overrides(
            get_profile(args.profile, device), psg=overrides["psg"], evaluation=overrides["evaluation"]
        )
        profile.psg.validate()
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = args.out or Path("runs") / f"generate-{spec.name}-{'-'.join(map(str, classes))}-eps{format_epsilon(args.eps)}"
    out.mkdir(parents=True, exist_ok=True)

    try:
        train = load_images(spec.name, train=True, data_dir=args.data_dir).only_classes(classes)
        test = load_images(spec.name, train=False, data_dir=args.data_dir).only_classes(classes)
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("profile %s on %s: %d private images of classes %s", profile.name, device, len(train), classes)

    started = time.perf_counter()
    synthetic = generate_private_set(
        train, classes, spec, epsilon=args.eps, delta=args.delta, config=profile.psg, device=device, seed=args.seed
    )
    generation_seconds = time.perf_counter() - started
    synthetic.save(out / "synthetic.pt")
    save_grid(synthetic.images, synthetic.labels, spec.name, out / "synthetic.png")
    record = synthetic.privacy
    log.info(
        "spent epsilon=%.4f delta=%g (sigma=%.4f, %d steps at q=%.5f, %s) in %.0f s",
        record.epsilon, record.delta, record.noise_multiplier, record.steps, record.sample_rate,
        record.accountant, generation_seconds,
    )  # fmt: skip

    summary = {
        "dataset": spec.name,
        "classes": classes,
        "profile": profile.name,
        "device": device,
        "privacy": record.to_dict(),
        "generation_seconds": generation_seconds,
        "psg": asdict(profile.psg),
        "evaluation_config": asdict(profile.evaluation),
    }
    if not args.no_eval:
        started = time.perf_counter()
        evaluation = evaluate_training_set(
            synthetic.as_image_set(), test, spec, profile.evaluation, device=device, seed=args.seed, progress=True
        )
        summary["accuracy_mean"] = evaluation.mean
        summary["accuracy_std"] = evaluation.std
        summary["accuracies"] = evaluation.accuracies
        summary["evaluation_seconds"] = time.perf_counter() - started
        print(
            f"accuracy on real test images of classes {classes}: "
            f"{100 * evaluation.mean:.2f}% ± {100 * evaluation.std:.2f} ({len(evaluation.accuracies)} classifiers)"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/synthetic.pt, synthetic.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
