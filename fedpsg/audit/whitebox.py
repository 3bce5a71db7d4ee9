"""White-box canary audit of a party's Gaussian mechanism.

The black-box audit (:mod:`fedpsg.audit.canary`) asks what a release leaks about its data; this
one asks whether the party's *implementation* delivers the noise its accountant claims. Following
Steinke, Nasr & Jagielski (NeurIPS 2023, white-box DP-SGD) and Nasr et al. (USENIX Security 2023):

* ``m`` Dirac canaries, each in the run with probability 1/2 (the auditor's public seed). Canary
  ``j`` is an extra per-example contribution along one coordinate ``i_j`` of the mechanism's
  released values (distinct coordinates, drawn by the auditor), of norm ``4 x`` the contribution
  bound the mechanism declares, so that the method's own clipping has work to do.
* They go through the real code path: at every Gaussian release (the hook in
  :func:`fedpsg.dp.mechanisms.gaussian_mechanism`, which every method uses), each included canary is
  sampled at the declared (accounted) rate, clipped by the method's declared clipping function,
  and added to the values before the party's secret noise. A canary of a group (dpdm: a class)
  enters only that group's releases.
* The auditor observes every noisy output (more than a party releases: that is what makes the audit
  strong) and, like the adversary of the DP definition, knows everything but the canaries'
  membership: it sees the real data's clipped sum inside the mechanism and subtracts it. Canary
  ``j`` scores ``sum_t (y_t[i_j] - x_t[i_j]) / bound_t`` (``x_t``: the values before canaries and
  noise), which leaves the canary's own contributions and the noise. (The accounting holds given the
  other examples and their sampling: subsampling amplification conditions on them.)

Two bounds from the scores:

* **Steinke-Nasr-Jagielski** (:func:`fedpsg.audit.canary.bound_from_scores`): guess the top scores
  "in" and the bottom ones "out"; a rigorous lower bound on epsilon. Its p-value carries
  ``2 m delta`` for delta, which makes it vacuous from a few thousand canaries at delta = 1e-5.
* **Gaussian** (in the manner of "Let's Ask Gauss", Agrawal et al., arXiv 2606.12733): the scores of
  included and excluded canaries are two Gaussians ``N(mu_in, s^2)``, ``N(mu_out, s^2)``; their
  separation ``mu = (mu_in - mu_out) / s``, taken at its lower confidence limit (t-interval of
  the mean difference and chi-square limit of ``s``, the confidence split between them), is a Gaussian-DP parameter,
  and its trade-off curve gives epsilon at the run's delta. Tighter, but it rests on the scores
  being Gaussian (sums of many noisy releases are; an included canary's adds a binomial count of
  its samplings, which skews it when few releases sample it).

Each bound is taken at 97.5%, so that a VIOLATION resting on either holds at 95%.

Faults (controls) are injected at the mechanism while the accountant still claims the original
epsilon: the noise removed, the noise multiplier halved, the clipping removed (the canaries skip
the method's clipping function and enter at 4x the bound), and sampling at twice the accounted rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from scipy import optimize, stats

from fedpsg.audit.canary import CONFIDENCE, audited_release, bound_from_scores
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy
from fedpsg.dp.mechanisms import Contribution, tapped
from fedpsg.methods import Method, PartyStage, Release

FAULTS = ("none", "noise-removed", "noise-halved", "clipping-removed", "double-sampling")
NOISE_SCALE = {"noise-removed": 0.0, "noise-halved": 0.5}
CANARY_NORM = 4.0  # a canary's norm before clipping, in units of the declared bound
# Each bound at 97.5%, so that a verdict resting on either holds at 95% (Bonferroni).
BOUND_CONFIDENCE = 1 - (1 - CONFIDENCE) / 2
MAX_EPSILON = 1e4  # beyond this a Gaussian bound is reported as infinite


class CanaryTap:
    """Adds Dirac canaries to every Gaussian release and scores them by their aligned sums.

    Canary ``j`` sits at offset ``i_j`` of every row of a release (``Contribution.rows``; one row
    for most methods): its direction is ``u_j = sum_r e_{r, i_j} / sqrt(rows)``, a unit vector
    whose every row the method's per-row clipping bounds as it bounds a real example.
    """

    def __init__(
        self, included: torch.Tensor, groups: torch.Tensor, generator: torch.Generator, fault: str = "none"
    ) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; available: {', '.join(FAULTS)}")
        self.included, self.groups, self.generator, self.fault = included, groups, generator, fault
        self.scores = torch.zeros(len(included), dtype=torch.float64)
        self.observed = torch.zeros(len(included), dtype=torch.long)  # releases each canary was scored on
        self.releases = 0
        self.fault_applies = fault not in ("clipping-removed", "double-sampling")  # set on the first release it changes
        self._offsets: dict[int, torch.Tensor] = {}
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None

    def coordinates(self, size: int, rows: int) -> torch.Tensor:
        """Each canary's coordinates in a release of ``size`` values: ``(m, rows)``, one per row, distinct."""
        if size % rows:
            raise ValueError(f"a release of {size} values does not split into {rows} equal rows")
        width = size // rows
        if width not in self._offsets:
            if width < len(self.included):
                raise ValueError(f"a release row of {width} values has room for at most {width} Dirac canaries")
            self._offsets[width] = torch.randperm(width, generator=self.generator)[: len(self.included)]
        return self._offsets[width][:, None] + width * torch.arange(rows)[None, :]

    def before_noise(
        self, values: list[torch.Tensor], std: float, contribution: Contribution
    ) -> tuple[list[torch.Tensor], float]:
        sizes = [v.numel() for v in values]
        where = self.coordinates(sum(sizes), contribution.rows)
        flat = torch.cat([v.detach().flatten() for v in values])
        known = flat[where.flatten().to(flat.device)].view_as(where).cpu().double()
        members = torch.ones_like(self.included) if contribution.group is None else self.groups == contribution.group
        if self.fault == "clipping-removed" and contribution.clip is not None:
            self.fault_applies = True
        if self.fault == "double-sampling" and contribution.sample_rate < 1:
            self.fault_applies = True
        rate = min(1.0, contribution.sample_rate * (2.0 if self.fault == "double-sampling" else 1.0))
        sampled = members & self.included & (torch.rand(len(self.included), generator=self.generator) < rate)
        chosen = sampled.nonzero().flatten()
        if len(chosen):
            clipped = contribution.clip is not None and self.fault != "clipping-removed"
            # Before clipping, CANARY_NORM times the bound; a contribution bounded by construction
            # (no clipping declared) is made at the bound itself.
            norm = contribution.bound * (CANARY_NORM if contribution.clip is not None else 1.0)
            rows = torch.zeros(len(chosen), sum(sizes), dtype=values[0].dtype)
            rows.scatter_(1, where[chosen], norm / math.sqrt(contribution.rows))
            parts = [
                part.reshape(len(chosen), *value.shape).to(value.device)
                for part, value in zip(rows.split(sizes, dim=1), values)
            ]
            if clipped:
                parts = contribution.clip(parts)
            values = [value + part.sum(0) for value, part in zip(values, parts)]
        self._pending = (members, where, known, contribution.bound * math.sqrt(contribution.rows))
        return values, std * NOISE_SCALE.get(self.fault, 1.0)

    def after_noise(self, noisy: list[torch.Tensor], contribution: Contribution) -> None:
        members, where, known, scale = self._pending
        flat = torch.cat([n.detach().flatten() for n in noisy])
        seen = flat[where.flatten().to(flat.device)].view_as(where).cpu().double()
        # <y - x, u_j> / bound with u_j spread over the rows: the row sum over sqrt(rows) * bound.
        self.scores[members] += (seen - known)[members].sum(1) / scale
        self.observed[members] += 1
        self.releases += 1


# ----- bounds ----------------------------------------------------------------------------------
def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    # e^eps Phi(...) in log space: for large mu and eps, e^eps alone overflows.
    return float(stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at which mu-Gaussian DP holds with ``delta`` (0 if it holds at epsilon 0)."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
        if high > MAX_EPSILON:  # scores that separate (almost) perfectly: no finite claim survives them
            return math.inf
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu whose Gaussian-DP curve passes through (epsilon, delta): the claim as a separation."""
    high = 1.0
    while gdp_epsilon(high, delta) < epsilon:
        high *= 2
    return float(optimize.brentq(lambda mu: gdp_epsilon(mu, delta) - epsilon, 1e-9, high, xtol=1e-10))


def gaussian_bound(scores: torch.Tensor, included: torch.Tensor, delta: float, confidence: float = CONFIDENCE) -> dict:
    """Epsilon from the two score Gaussians' separation, at its lower confidence limit."""
    inside, outside = scores[included].double(), scores[~included].double()
    n_in, n_out = len(inside), len(outside)
    if min(n_in, n_out) < 2:
        raise ValueError("the Gaussian bound needs at least two included and two excluded canaries")
    difference = float(inside.mean() - outside.mean())
    dof = n_in + n_out - 2
    pooled = math.sqrt((float(inside.var()) * (n_in - 1) + float(outside.var()) * (n_out - 1)) / dof)
    alpha = (1 - confidence) / 2  # split between the mean difference and the spread
    low_difference = difference - stats.t.ppf(1 - alpha, dof) * pooled * math.sqrt(1 / n_in + 1 / n_out)
    high_spread = pooled * math.sqrt(dof / stats.chi2.ppf(alpha, dof))
    if pooled == 0:  # no noise at all: the scores separate perfectly
        mu, mu_low = (math.inf, math.inf) if difference > 0 else (0.0, 0.0)
    else:
        mu, mu_low = difference / pooled, max(0.0, low_difference / high_spread)
    return {
        "mu": mu,
        "mu_lower": mu_low,
        "epsilon_estimate": math.inf if math.isinf(mu) else gdp_epsilon(mu, delta),
        "epsilon_lower_bound": math.inf if math.isinf(mu_low) else gdp_epsilon(mu_low, delta),
        "confidence": confidence,
    }


def canaries_for(mu: float, target_mu: float, confidence: float = CONFIDENCE) -> int | None:
    """Canaries (half in) at which a separation ``mu`` would give a lower limit of ``target_mu``; None if never."""
    if mu <= target_mu:
        return None
    z_mean = stats.norm.ppf(1 - (1 - confidence) / 2)
    for m in (2**k for k in range(3, 30)):
        dof = m - 2
        spread = math.sqrt(dof / stats.chi2.ppf((1 - confidence) / 2, dof))
        if (mu - z_mean * 2 / math.sqrt(m)) / spread >= target_mu:
            return m
    return None


# ----- one audited run --------------------------------------------------------------------------
@dataclass(frozen=True)
class WhiteBoxRun:
    fault: str
    claimed_epsilon: float
    canaries: int
    releases: int  # Gaussian releases the auditor observed
    snj: dict  # bound_from_scores's result
    gaussian: dict  # gaussian_bound's result
    seconds: float
    release: Release = field(repr=False)
    fault_applies: bool = True  # False: the mechanism has nothing the fault changes (e.g. no clipping)
    scores: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))  # per canary
    included: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    observed: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def epsilon_lower_bound(self) -> float:
        return max(self.snj["epsilon_lower_bound"], self.gaussian["epsilon_lower_bound"])

    def verdict(self) -> str:
        """VIOLATION when either bound exceeds the claim (each holds at 97.5%: 95% for the verdict)."""
        claimed = self.claimed_epsilon
        if not self.fault_applies:
            return f"n/a: {self.fault} changes nothing in this mechanism"
        if self.snj["epsilon_lower_bound"] > claimed:
            return f"VIOLATION: epsilon >= {self.snj['epsilon_lower_bound']:.2f} > claimed {claimed:.3g} (SNJ bound)"
        if self.gaussian["epsilon_lower_bound"] > claimed:
            return (
                f"VIOLATION: epsilon >= {self.gaussian['epsilon_lower_bound']:.2f} > claimed {claimed:.3g} "
                "(Gaussian bound)"
            )
        return f"consistent: epsilon >= {self.epsilon_lower_bound:.2f} <= claimed {claimed:.3g}"

    def to_dict(self) -> dict:
        return {
            "fault": self.fault,
            "claimed_epsilon": self.claimed_epsilon,
            "verdict": self.verdict(),
            "canaries": self.canaries,
            "releases_observed": self.releases,
            "snj_lower_bound": self.snj["epsilon_lower_bound"],
            "snj_best": {k: v for k, v in self.snj.items() if k != "tries"},
            "gaussian": self.gaussian,
            "seconds": self.seconds,
            "privacy": self.release.privacy.to_dict(),
            "fault_applies": self.fault_applies,
        }


def run_white_box(
    method: Method,
    config: Any,
    stage: PartyStage,
    canaries: int,
    ledger: Ledger,
    policy: PartyPolicy,
    fault: str = "none",
    seed: int = 0,
) -> WhiteBoxRun:
    """Run ``method`` once with ``canaries`` white-box canaries at its Gaussian mechanism and bound its epsilon.

    ``seed`` is the auditor's (public): which canaries are in, their groups, coordinates and
    sampling. The run reads the party's data and is charged to its ``ledger``; a faulty run is
    recorded as a non-private one (it is what it is, whatever the accountant claims).
    """
    if canaries < 4:
        raise ValueError(f"a white-box audit needs at least 4 canaries, got {canaries}")
    generator = torch.Generator().manual_seed(seed)
    included = torch.rand(canaries, generator=generator) < 0.5
    groups = torch.as_tensor(stage.classes)[torch.randint(len(stage.classes), (canaries,), generator=generator)]
    tap = CanaryTap(included, groups, generator, fault)
    audited = replace(stage, label=f"{stage.label} [white-box, {fault}]")
    purpose = f"white-box audit of {method.name} ({fault})"
    started = time.perf_counter()
    with tapped(tap):
        release = audited_release(method, audited, config, ledger, policy, purpose, control=fault != "none")
    if tap.releases == 0:
        raise RuntimeError(f"{method.name} made no Gaussian release: nothing to audit (is epsilon infinite?)")
    seen = tap.observed > 0  # a group no release covered (an empty class) carries no evidence
    scores, inside = tap.scores[seen], tap.included[seen]
    snj = bound_from_scores({"aligned": scores}, inside, stage.delta, confidence=BOUND_CONFIDENCE)
    gaussian = gaussian_bound(scores, inside, stage.delta, confidence=BOUND_CONFIDENCE)
    return WhiteBoxRun(
        fault, release.privacy.epsilon, int(seen.sum()), tap.releases, snj, gaussian,
        time.perf_counter() - started, release, tap.fault_applies, tap.scores, tap.included, tap.observed,
    )  # fmt: skip
