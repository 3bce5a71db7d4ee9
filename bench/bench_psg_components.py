"""Time the pieces of one PSG step in isolation (ms per call, median over repeats).

    python bench/bench_psg_components.py [--width 32] [--batch-size 128] [--spc 10] [--repeats 10]

The DP real-gradient step, the synthetic-set matching step (double backward), one inner
network step on the synthetic set, and a plain batch gradient for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from fedpsg.dp.gradients import private_gradient
from fedpsg.nn.matching import matching_distance
from fedpsg.nn.models import build_model


def median_ms(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--spc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = build_model("convnet", 1, 10, (28, 28), width=args.width)
    params = list(net.parameters())
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    syn = torch.randn(args.classes * args.spc, 1, 28, 28, requires_grad=True)
    syn_labels = torch.arange(args.classes).repeat_interleave(args.spc)
    dp_kwargs = {
        "max_grad_norm": 0.1,
        "noise_multiplier": 0.5,
        "expected_batch_size": args.batch_size,
        "sample_rate": 0.01,
    }
    real = private_gradient(net, x, y, **dp_kwargs)
    optimizer = torch.optim.SGD(params, lr=0.01)

    def synthetic_step() -> None:
        grads = torch.autograd.grad(F.cross_entropy(net(syn), syn_labels), params, create_graph=True)
        torch.autograd.grad(matching_distance(real, list(grads)), [syn])

    def inner_step() -> None:
        loss = F.cross_entropy(net(syn.detach()), syn_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def plain_step() -> None:
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()

    print(
        f"width {args.width}, batch {args.batch_size}, {len(syn)} synthetic images, {torch.get_num_threads()} threads"
    )
    print(
        f"DP real-gradient step   {median_ms(lambda: private_gradient(net, x, y, **dp_kwargs), args.repeats):8.1f} ms"
    )
    print(f"synthetic matching step {median_ms(synthetic_step, args.repeats):8.1f} ms")
    print(f"inner network step      {median_ms(inner_step, args.repeats):8.1f} ms")
    print(f"plain batch gradient    {median_ms(plain_step, args.repeats):8.1f} ms")


if __name__ == "__main__":
    main()
