"""Time PSG's DP real-gradient step on CPU against a plain batch gradient and Opacus hooks.

For each (width, batch) ConvNet on 1x28x28 inputs this measures, in one process:

* plain   -- the non-private batch gradient: ``zero_grad(); cross_entropy(model(x), y).backward()``
* fedpsg  -- ``fedpsg.dp.gradients.private_gradient`` (per-example grads, clip, sum, noise)
* opacus  -- the same step the straightforward Opacus way: a GradSampleModule (hooks), backward
             on the mean loss, clip the ``p.grad_sample`` tensors, sum, noise

Methods are run round-robin (one step of each per repeat) so that drifting machine load hits
them alike; the tables report the median (and the minimum) wall-clock ms per step after a
warm-up step.

    python bench/bench_dp_step.py [--widths 128 64 32] [--batch-sizes 256 256 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional as F

from fedpsg.dp.gradients import private_gradient
from fedpsg.nn.models import build_model

MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0


def plain_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()


def fedpsg_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise_multiplier: float = NOISE_MULTIPLIER
) -> list[torch.Tensor]:
    return private_gradient(
        model,
        images,
        labels,
        max_grad_norm=MAX_GRAD_NORM,
        noise_multiplier=noise_multiplier,
        expected_batch_size=len(labels),
        sample_rate=1.0,  # only declared: the benchmark times one step on a given batch
    )


def opacus_step(
    module: GradSampleModule, images: torch.Tensor, labels: torch.Tensor, noise_multiplier: float = NOISE_MULTIPLIER
) -> list[torch.Tensor]:
    """Clip-and-noise as Opacus's DPOptimizer does it, from GradSampleModule's ``grad_sample``."""
    module.zero_grad(set_to_none=True)  # also clears grad_sample
    F.cross_entropy(module(images), labels).backward()  # loss_reduction="mean" is undone by Opacus
    params = [p for p in module.parameters() if p.requires_grad]
    samples = [p.grad_sample for p in params]
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in samples], dim=1).norm(2, dim=1)
    factor = (MAX_GRAD_NORM / (norms + 1e-12)).clamp(max=1.0)
    std = noise_multiplier * MAX_GRAD_NORM
    grads = []
    for g in samples:
        total = torch.einsum("i,i...->...", factor, g)
        if std > 0:
            total = total + std * torch.randn_like(total)
        grads.append(total / len(labels))
    return grads


def time_round_robin(steps: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall-clock ms of each step of each callable, interleaving them."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed * 1000)
    return times


def check_agreement(model: nn.Module, module: GradSampleModule, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest difference between fedpsg and Opacus with the noise off (sanity check of the comparison)."""
    ours = fedpsg_step(model, images, labels, noise_multiplier=0.0)
    theirs = opacus_step(module, images, labels, noise_multiplier=0.0)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="one per width (default 256/256/128)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    default_batch = {128: 256, 64: 256, 32: 128}
    batch_sizes = args.batch_sizes or [default_batch.get(w, 256) for w in args.widths]
    if len(batch_sizes) != len(args.widths):
        parser.error("give one batch size per width")
    if args.threads:
        torch.set_num_threads(args.threads)
    # The input images do not require grad; Opacus's backward hooks say so on every step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    rows = []
    for width, batch in zip(args.widths, batch_sizes):
        torch.manual_seed(args.seed)
        model = build_model("convnet", 1, 10, (28, 28), width=width)
        module = GradSampleModule(copy.deepcopy(model))
        images = torch.randn(batch, 1, 28, 28)
        labels = torch.randint(0, 10, (batch,))
        diff = check_agreement(model, module, images, labels)
        times = time_round_robin(
            {
                "plain": lambda m=model, x=images, y=labels: plain_step(m, x, y),
                "fedpsg": lambda m=model, x=images, y=labels: fedpsg_step(m, x, y),
                "opacus": lambda m=module, x=images, y=labels: opacus_step(m, x, y),
            },
            repeats=args.repeats,
            warmup=args.warmup,
        )
        rows.append((width, batch, times, diff))
        print(f"  width {width}, B={batch}: done (fedpsg vs opacus max |diff| without noise: {diff:.1e})", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    # The median is the headline; the minimum is less sensitive to other processes on a shared machine.
    for label, summary in (("median", statistics.median), ("minimum", min)):
        print(f"\n{label} over {args.repeats} repeats:\n")
        print("| width | batch | plain ms | fedpsg ms | opacus ms | fedpsg / plain | opacus / fedpsg |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for width, batch, times, _ in rows:
            ms = {name: summary(values) for name, values in times.items()}
            print(
                f"| {width} | {batch} | {ms['plain']:.0f} | {ms['fedpsg']:.0f} | {ms['opacus']:.0f} "
                f"| {ms['fedpsg'] / ms['plain']:.2f}x | {ms['opacus'] / ms['fedpsg']:.2f}x |"
            )


if __name__ == "__main__":
    main()
