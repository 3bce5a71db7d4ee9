"""The DP mechanisms every release is built from: Poisson sampling and the Gaussian mechanism.

Both draw from the party's secret generators (:mod:`fedpsg.dp.secret`); every noisy release in
fedpsg goes through :func:`gaussian_mechanism` (DP-SGD's Opacus optimizer too, through
:func:`add_noise_with_mechanism`), so tests count releases and compare them with what the
accountant composed.

Each call declares how one example enters it (:class:`Contribution`: its L2 bound, the rate at
which it is sampled, the method's own clipping). That declaration is the hook of the white-box
audit (:mod:`fedpsg.audit.whitebox`): inside :func:`tapped`, a tap adds canary contributions
before the noise and observes every noisy output, so any method built on this function is
auditable without audit code of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _generate_noise, _mark_as_processed

Clip = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class Contribution:
    """How one example enters a Gaussian release (what the accountant assumed).

    ``bound``: the L2 norm one example's contribution to the released values can have (the
    sensitivity the noise is calibrated to, add/remove). ``sample_rate``: the probability that
    an example is in this release (Poisson; 1 = every example). ``clip``: the method's own
    clipping of per-example contributions, given tensors shaped like the values with a leading
    examples dimension (``None``: bounded by construction, e.g. DP-Merf's unit-norm features).
    ``group``: the released values hold only this group's examples (dpdm: one class per release).
    ``rows``: one example can move each of this many equal rows of the values (GS-WGAN: each of the
    B sample gradients, by up to ``bound / sqrt(rows)``); 1 = the values as one vector.
    """

    bound: float
    sample_rate: float
    clip: Clip | None = None
    group: int | None = None
    rows: int = 1

    @classmethod
    def clipped_jointly(cls, max_norm: float, sample_rate: float) -> Contribution:
        """Per-example gradients clipped to ``max_norm`` over all tensors jointly (PSG, DP-SGD)."""
        return cls(max_norm, sample_rate, clip=lambda rows: clip_jointly(rows, max_norm))


class MechanismTap(Protocol):
    """What sees a Gaussian release from inside (the white-box audit)."""

    def before_noise(
        self, values: list[torch.Tensor], std: float, contribution: Contribution
    ) -> tuple[list[torch.Tensor], float]:
        """The values and noise std the mechanism goes on with."""

    def after_noise(self, noisy: list[torch.Tensor], contribution: Contribution) -> None:
        """Observe the release."""


_TAP: ContextVar[MechanismTap | None] = ContextVar("fedpsg_mechanism_tap", default=None)


@contextmanager
def tapped(tap: MechanismTap) -> Iterator[None]:
    """Every Gaussian release in this context (this thread) passes through ``tap``."""
    token = _TAP.set(tap)
    try:
        yield
    finally:
        _TAP.reset(token)


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson batch: each of ``n`` examples is in it independently with prob. ``sample_rate``."""
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten()


def gaussian_mechanism(
    values: list[torch.Tensor],
    std: float,
    generator: torch.Generator,
    *,
    contribution: Contribution,
    secure: bool = True,
) -> list[torch.Tensor]:
    """One release of the Gaussian mechanism: ``value + N(0, std^2 I)`` for every tensor.

    Every noisy release in fedpsg (each DP real-gradient step of PSG, DP-Merf's embedding, each
    class and iteration of dpdm) goes through this function, so tests can count the releases
    made and compare them with what the accountant composed. ``generator`` must be the party's
    secret (:mod:`fedpsg.dp.secret`). ``secure`` draws the noise as Opacus's ``secure_mode`` does
    (four draws summed and halved), which defeats the floating-point attacks on naive Gaussian
    sampling (Mironov 2012; arXiv 2107.10138, 2112.05307) at the cost of four normal draws.
    ``contribution``: how one example enters the values (see :class:`Contribution`).
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    tap = _TAP.get()
    if tap is not None:
        values, std = tap.before_noise(values, std, contribution)
    noisy = [value + _generate_noise(std, value, generator, secure_mode=secure) for value in values]
    if tap is not None:
        tap.after_noise(noisy, contribution)
    return noisy


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / ||g_i||)``: what scales each example's contribution into the C-ball."""
    return (max_norm / (norms + 1e-12)).clamp(max=1.0)


def clip_jointly(contributions: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Each example's contribution (first dimension) over all tensors jointly, scaled to norm at most ``max_norm``."""
    norms = torch.linalg.vector_norm(torch.cat([c.flatten(1) for c in contributions], dim=1), dim=1)
    scale = clip_factors(norms, max_norm)
    return [c * scale.view(-1, *([1] * (c.dim() - 1))) for c in contributions]


def add_noise_with_mechanism(optimizer: DPOptimizer, sample_rate: float) -> None:
    """Let an Opacus ``DPOptimizer`` add its noise through :func:`gaussian_mechanism`.

    The same noise (Opacus's ``_generate_noise`` with the optimizer's generator, std
    ``noise_multiplier * max_grad_norm``, its ``secure_mode``) on the same clipped sums, declared
    as per-example contributions clipped jointly to ``max_grad_norm`` (Opacus's flat clipping)
    at ``sample_rate``: DP-SGD's steps are counted and auditable like every other release.
    """
    if type(optimizer) is not DPOptimizer or not isinstance(optimizer.max_grad_norm, (int, float)):
        # Per-layer or ghost clipping bound and noise the gradients otherwise than declared here.
        raise TypeError(f"only Opacus's flat-clipping DPOptimizer is supported, got {type(optimizer).__name__}")

    def add_noise() -> None:
        params = optimizer.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        bound = optimizer.max_grad_norm
        noisy = gaussian_mechanism(
            [p.summed_grad for p in params],
            optimizer.noise_multiplier * bound,
            optimizer.generator,
            contribution=Contribution.clipped_jointly(bound, sample_rate),
            secure=optimizer.secure_mode,
        )
        for p, grad in zip(params, noisy):
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
