"""Command-line pieces shared by ``fedpsg.generate`` and ``fedpsg.simulate``."""

from __future__ import annotations

import argparse
import math

from fedpsg.privacy import ACCOUNTANTS


def positive_float_or_inf(text: str) -> float:
    value = float(text)
    if not (value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'inf'), got {text}")
    return value


def epsilon_list(text: str) -> list[float]:
    """``10`` or a sweep ``1,10``: each > 0 or ``inf``."""
    return [positive_float_or_inf(part.strip()) for part in text.split(",") if part.strip()]


def open_unit_float(text: str) -> float:
    value = float(text)
    if not (0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_profile_overrides(parser: argparse.ArgumentParser) -> None:
    """Flags that override single values of the chosen profile (None = keep the profile's)."""
    group = parser.add_argument_group("profile overrides (default: the profile's value)")
    group.add_argument("--iterations", type=positive_int, help="PSG runs R (fresh networks)")
    group.add_argument("--outer-loop", type=positive_int, help="PSG outer iterations T")
    group.add_argument("--batch-loop", type=positive_int, help="DP real batches K per outer iteration")
    group.add_argument("--inner-loop", type=int, help="network steps J on the synthetic set")
    group.add_argument("--batch-size", type=positive_int, help="expected Poisson batch size B")
    group.add_argument("--max-grad-norm", type=positive_float_or_inf, help="per-example clipping bound C")
    group.add_argument("--lr-images", type=positive_float_or_inf)
    group.add_argument("--lr-net", type=positive_float_or_inf)
    group.add_argument("--width", type=positive_int, help="ConvNet width for generation")
    group.add_argument("--accountant", choices=ACCOUNTANTS)
    group.add_argument("--eval-width", type=positive_int)
    group.add_argument("--eval-epochs", type=positive_int)
    group.add_argument("--num-evals", type=positive_int)
    group.add_argument("--no-augment", action="store_true", help="evaluate without augmentation")


def add_baseline_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baseline overrides (default: the profile's value)")
    group.add_argument("--dpsgd-epochs", type=positive_int, help="DP-SGD finetuning epochs per stage")
    group.add_argument("--dpmerf-steps", type=positive_int, help="DP-Merf generator training steps")
    group.add_argument("--dpmerf-samples", type=positive_int, help="DP-Merf samples per class to replay")
    group.add_argument("--dpmerf-eval-epochs", type=positive_int, help="epochs of replay on DP-Merf sets")


def profile_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """Profile overrides by section (see ``fedpsg.profiles.SECTIONS``) from parsed flags."""
    psg = {
        "iterations": args.iterations,
        "outer_loop": args.outer_loop,
        "batch_loop": args.batch_loop,
        "inner_loop": args.inner_loop,
        "batch_size": args.batch_size,
        "max_grad_norm": args.max_grad_norm,
        "lr_images": args.lr_images,
        "lr_net": args.lr_net,
        "width": args.width,
        "accountant": args.accountant,
        "spc": getattr(args, "spc", None),
    }
    evaluation = {
        "width": args.eval_width,
        "epochs": args.eval_epochs,
        "num_evals": args.num_evals,
        "augment": False if args.no_augment else None,
    }
    overrides = {"psg": psg, "evaluation": evaluation}
    if hasattr(args, "dpsgd_epochs"):
        overrides["dpsgd"] = {"epochs": args.dpsgd_epochs}
        overrides["dpmerf"] = {"generator_steps": args.dpmerf_steps, "samples_per_class": args.dpmerf_samples}
        overrides["dpmerf_evaluation"] = {
            "epochs": args.dpmerf_eval_epochs,
            "num_evals": args.num_evals,
            "augment": False if args.no_augment else None,
        }
    return overrides


def format_epsilon(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"
