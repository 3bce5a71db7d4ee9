"""Probe DP distribution matching (fedpsg.dpdm) centralised on all classes of a dataset.

    python bench/dpdm_probe.py --dataset fmnist --eps 10 [--preset cpu] [--iterations 1000]
        [--lr-images 100] [--batch-size 64] [--width 32] [--augment | --no-augment] [--progress-interval 60]

Generates one DP synthetic set (spc per class) from all training images of the chosen classes,
then evaluates it with fedpsg.nn.evaluation.evaluate_training_set under a fixed protocol (default:
the cpu profile's EvalConfig(width=32, epochs=300, augment=True, num_evals=2)) on the real test
images. Prints accuracy, generation CPU and wall seconds, the load average around the run, and
one JSON line with everything (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.data.synthetic import SyntheticSet, save_grid
from fedpsg.methods import PartyStage
from fedpsg.methods.dpdm import DPDM, DPDM_PRESETS
from fedpsg.nn.evaluation import EvalConfig, evaluate_training_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fmnist")
    parser.add_argument("--classes", default=None, help="comma-separated (default: all)")
    parser.add_argument("--eps", type=float, default=10.0, help="'inf' = non-private")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--preset", choices=sorted(DPDM_PRESETS), default="cpu")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--lr-images", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-norm", type=float)
    parser.add_argument("--spc", type=int, default=10)
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--eval-width", type=int, default=32)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-evals", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--save", default=None, help="folder for synthetic.pt and synthetic.png")
    parser.add_argument("--progress-interval", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {
        "iterations": args.iterations,
        "lr_images": args.lr_images,
        "momentum": args.momentum,
        "batch_size": args.batch_size,
        "max_norm": args.max_norm,
        "spc": args.spc,
        "width": args.width,
        "depth": args.depth,
        "augment": args.augment,
    }
    config = replace(DPDM_PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    evaluation = EvalConfig(
        width=args.eval_width, epochs=args.eval_epochs, augment=args.eval_augment, num_evals=args.num_evals
    )
    spec = dataset_spec(args.dataset)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(spec.num_classes))
    train = load_images(spec.name, train=True, data_dir=args.data_dir).only_classes(classes)
    test = load_images(spec.name, train=False, data_dir=args.data_dir).only_classes(classes)

    stage = PartyStage(
        train,
        classes,
        spec,
        epsilon=args.eps,
        delta=args.delta,
        seed=args.seed,
        label=f"dpdm {spec.name}",
        progress_interval=args.progress_interval,
    )
    load_before = os.getloadavg()
    cpu, wall = time.process_time(), time.perf_counter()
    release = DPDM().run(stage, config)  # a fresh secret, as a party draws it
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    load_after = os.getloadavg()
    eval_wall = time.perf_counter()
    result = evaluate_training_set(ImageSet(release.images, release.labels), test, spec, evaluation, seed=args.seed)
    eval_wall = time.perf_counter() - eval_wall
    if args.save:
        synthetic = SyntheticSet(
            release.images, release.labels, spec.name, classes, release.privacy, {"method": "dpdm", **asdict(config)}
        )
        synthetic.save(os.path.join(args.save, "synthetic.pt"))
        save_grid(release.images, release.labels, spec.name, os.path.join(args.save, "synthetic.png"))

    record = release.privacy
    eps_text = "inf" if math.isinf(args.eps) else f"{args.eps:g}"
    print(
        f"dpdm {spec.name} eps={eps_text}: accuracy {100 * result.mean:.2f}% ± {100 * result.std:.2f} "
        f"| generation {cpu:.0f} CPU s, {wall:.0f} s wall | sigma={record.noise_multiplier:.3f} "
        f"q={record.sample_rate:.5f} T={record.steps} | load {load_before[0]:.2f} -> {load_after[0]:.2f} "
        f"| eval {eval_wall:.0f} s"
    )
    print(
        json.dumps(
            {
                "dataset": spec.name,
                "eps": args.eps,
                "config": asdict(config),
                "evaluation": asdict(evaluation),
                "accuracy": result.mean,
                "accuracies": result.accuracies,
                "cpu_s": cpu,
                "wall_s": wall,
                "threads": torch.get_num_threads(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "sigma": record.noise_multiplier,
                "sample_rate": record.sample_rate,
                "argv": sys.argv[1:] if argv is None else argv,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
