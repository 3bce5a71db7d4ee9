"""The DP mechanisms every release is built from: Poisson sampling and the Gaussian mechanism.

Both draw from the party's secret generators (:mod:`fedpsg.dp.secret`); every noisy release in
fedpsg goes through :func:`gaussian_mechanism`, so tests count releases and compare them with
what the accountant composed.
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _generate_noise


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson batch: each of ``n`` examples is in it independently with prob. ``sample_rate``."""
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten()


def gaussian_mechanism(
    values: list[torch.Tensor], std: float, generator: torch.Generator, *, secure: bool = True
) -> list[torch.Tensor]:
    """One release of the Gaussian mechanism: ``value + N(0, std^2 I)`` for every tensor.

    Every noisy release in fedpsg (each DP real-gradient step of PSG, DP-Merf's embedding, each
    class and iteration of dpdm) goes through this function, so tests can count the releases
    made and compare them with what the accountant composed. ``generator`` must be the party's
    secret (:mod:`fedpsg.dp.secret`). ``secure`` draws the noise as Opacus's ``secure_mode`` does
    (four draws summed and halved), which defeats the floating-point attacks on naive Gaussian
    sampling (Mironov 2012; arXiv 2107.10138, 2112.05307) at the cost of four normal draws.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return [value + _generate_noise(std, value, generator, secure_mode=secure) for value in values]
