"""Empirical privacy audit of one party run with canaries (Steinke, Nasr & Jagielski, NeurIPS 2023).

The auditor adds ``m`` canaries to the party's private data, each included independently with
probability 1/2, runs the party's method once, scores every canary against the release, and guesses
"included" for the ``k`` highest scores and "excluded" for the ``k`` lowest. If the run is
(epsilon, delta)-DP, the number of correct guesses is stochastically dominated by
``Binomial(2k, e^eps / (1 + e^eps))`` (their Theorem 3, pure-DP form); we add ``2 m delta`` to the
p-value to cover delta. The largest epsilon that this domination rejects at the stated confidence
is an empirical *lower* bound on the run's epsilon: above the accountant's figure it means a bug.

Canaries are real images of classes the party does not hold, labelled with one of its classes at
random (from the held-out test split, so they are nobody's training data): out of distribution and
mislabelled, hence the examples a run is most likely to memorise, which makes the audit stronger.

Scores (higher = "looks included"):

* ``loss``: minus the cross-entropy of the canary's (wrong) label under a classifier trained on the
  released set (the coordinator's evaluation protocol), or under the released model (DP-SGD):
  a run that learnt the canary predicts its label;
* ``distance`` (sets only): minus the distance to the nearest released image of the canary's label:
  a set that copies the canary holds an image close to it.

Several numbers of guesses and both scores are tried; the confidence is split over all of them
(Bonferroni), so taking the best one is honest.

An audit only means something if it can catch a leak: :func:`audit_with_controls` also runs the
method non-private (``epsilon = inf``) and with the noise removed while the accountant still claims
epsilon (:func:`noise_removed`); if neither control reaches :data:`POWERFUL`, the audit says it is
too weak rather than reporting a reassuring number.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any
from unittest import mock

import opacus.optimizers.optimizer as opacus_optimizer
import torch
from torch.nn import functional as F

import fedpsg.dp.mechanisms
from fedpsg.budget.charge import charged_run
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy
from fedpsg.data.datasets import DatasetSpec, ImageSet
from fedpsg.data.synthetic import to_pixels
from fedpsg.methods import Method, PartyStage, Release
from fedpsg.nn.evaluation import EvalConfig, new_classifier, train_classifier

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)  # share of the canaries guessed (half "in", half "out")
POWERFUL = 1.0  # a positive control must reach this lower bound for the audit to mean anything
VARIANTS = ("private", "non-private", "noise-removed")


@dataclass(frozen=True)
class Canaries:
    images: torch.Tensor  # normalised, (m, C, H, W)
    labels: torch.Tensor  # the (wrong) label each canary carries: one of the party's classes
    true_labels: torch.Tensor
    included: torch.Tensor  # bool (m,): added to the party's data in this run

    def __len__(self) -> int:
        return len(self.labels)


def mislabeled_canaries(pool: ImageSet, classes: list[int], count: int, generator: torch.Generator) -> Canaries:
    """``count`` images of ``pool`` outside ``classes``, each given a random label from ``classes``."""
    if count < 2:
        raise ValueError(f"a canary audit needs at least 2 canaries (one guessed in, one out), got {count}")
    outside = torch.nonzero(~torch.isin(pool.labels, torch.as_tensor(classes))).flatten()
    if len(outside) < count:
        raise ValueError(f"only {len(outside)} images outside classes {classes} to make {count} canaries")
    chosen = outside[torch.randperm(len(outside), generator=generator)[:count]]
    labels = torch.as_tensor(classes)[torch.randint(len(classes), (count,), generator=generator)]
    included = torch.rand(count, generator=generator) < 0.5
    return Canaries(pool.images[chosen], labels, pool.labels[chosen], included)


def with_canaries(data: ImageSet, canaries: Canaries) -> ImageSet:
    keep = canaries.included
    return ImageSet(torch.cat([data.images, canaries.images[keep]]), torch.cat([data.labels, canaries.labels[keep]]))


# ----- statistics ------------------------------------------------------------------------------
def binomial_tail(trials: int, successes: int, p: float) -> float:
    """P[Binomial(trials, p) >= successes], summed in log space (no scipy needed)."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    if p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 0.0
    log_terms = [
        math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
        + i * math.log(p) + (trials - i) * math.log1p(-p)
        for i in range(successes, trials + 1)
    ]  # fmt: skip
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def p_value(guesses: int, correct: int, epsilon: float, delta: float = 0.0, canaries: int = 0) -> float:
    """How likely ``correct`` of ``guesses`` (or more) would be if the run were (epsilon, delta)-DP."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return min(1.0, binomial_tail(guesses, correct, p) + 2 * canaries * delta)


def epsilon_lower_bound(guesses: int, correct: int, alpha: float, delta: float = 0.0, canaries: int = 0) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` rejects at level ``alpha`` (0 if none)."""
    if p_value(guesses, correct, 0.0, delta, canaries) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(guesses, correct, high, delta, canaries) < alpha and high < 100:
        low, high = high, 2 * high
    for _ in range(60):  # invariant: p(low) < alpha <= p(high)
        mid = 0.5 * (low + high)
        if p_value(guesses, correct, mid, delta, canaries) < alpha:
            low = mid
        else:
            high = mid
    return low


def guess(score: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The canaries guessed "in" (the k highest scores) and "out" (the k lowest), k about ``fraction * m / 2``.

    k is capped at m // 2: a larger k would guess some canary both in and out.
    """
    m = len(score)
    if m < 2:
        raise ValueError(f"a canary audit needs at least 2 canaries (one guessed in, one out), got {m}")
    k = min(m // 2, max(1, round(fraction * m / 2)))
    order = score.argsort(descending=True)
    return order[:k], order[m - k :]


def bound_from_scores(
    scores: dict[str, torch.Tensor], included: torch.Tensor, delta: float, confidence: float = CONFIDENCE
) -> dict:
    """Best lower bound over scores x numbers of guesses, with the confidence split over all tries."""
    m = len(included)
    tries = [(name, fraction) for name in scores for fraction in GUESS_FRACTIONS]
    alpha = (1 - confidence) / len(tries)
    rows = []
    for name, fraction in tries:
        guessed_in, guessed_out = guess(scores[name], fraction)
        k = len(guessed_in)
        correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
        bound = epsilon_lower_bound(2 * k, correct, alpha, delta, m)
        rows.append({"score": name, "guesses": 2 * k, "correct": correct, "epsilon_lower_bound": bound})
    best = max(rows, key=lambda row: row["epsilon_lower_bound"])
    return {**best, "confidence": confidence, "tries": rows}


# ----- scoring ---------------------------------------------------------------------------------
@torch.no_grad()
def canary_scores(
    release: Release,
    canaries: Canaries,
    spec: DatasetSpec,
    evaluation: EvalConfig,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-canary membership scores against the release (higher = looks included)."""
    if release.images is not None:
        with torch.enable_grad():
            model = train_classifier(ImageSet(release.images, release.labels), spec, evaluation, device, seed)
    else:
        model = new_classifier(spec, evaluation, seed)
        model.load_state_dict(release.model_state)
    model.to(device).eval()
    logits = model(canaries.images.to(device)).cpu()
    scores = {"loss": -F.cross_entropy(logits, canaries.labels, reduction="none")}
    if release.images is not None:
        released = to_pixels(release.images, spec).flatten(1)
        distances = torch.cdist(to_pixels(canaries.images, spec).flatten(1), released)
        same_label = canaries.labels[:, None] == release.labels[None, :]
        scores["distance"] = -distances.masked_fill(~same_label, math.inf).min(1).values
    return scores


@contextmanager
def noise_removed() -> Iterator[None]:
    """Fault injection for the positive control: every Gaussian mechanism adds zero noise.

    Patches the one noise function fedpsg's releases use and the one Opacus's optimizer uses, so
    the accountant still reports the claimed epsilon while nothing is hidden.
    """

    def zero_noise(std, reference, generator=None, secure_mode=False):
        return torch.zeros_like(reference)

    with (
        mock.patch.object(fedpsg.dp.mechanisms, "_generate_noise", zero_noise),
        mock.patch.object(opacus_optimizer, "_generate_noise", zero_noise),
    ):
        yield


# ----- one audited run, and the controls ---------------------------------------------------------
@dataclass(frozen=True)
class AuditRun:
    variant: str  # one of VARIANTS
    claimed_epsilon: float  # what the party's accountant reports for the run
    bound: dict  # bound_from_scores's result
    seconds: float
    release: Release = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "variant": self.variant,
            "claimed_epsilon": self.claimed_epsilon,
            "epsilon_lower_bound": self.bound["epsilon_lower_bound"],
            "best": {k: v for k, v in self.bound.items() if k != "tries"},
            "tries": self.bound["tries"],
            "seconds": self.seconds,
            "privacy": self.release.privacy.to_dict(),
        }


def audited_release(
    method: Method,
    stage: PartyStage,
    config: Any,
    ledger: Ledger,
    policy: PartyPolicy,
    purpose: str,
    *,
    control: bool,
) -> Release:
    """One audited run of ``method``, written to the party's ``ledger`` before it reads the data.

    The audited run is charged like any release. A control's output (a fault, or no noise) stays
    with the auditor, who is the party itself: no coordinator's trust is needed, but it did read
    the data without (enough) noise, and is recorded as what it is: a non-private run.
    """
    if not control:
        return charged_run(method, stage, config, ledger, policy, purpose)
    planned = method.plan(replace(stage, epsilon=math.inf), config)
    with ledger.release(planned, replace(policy, trust_coordinator=True), method=method.name, purpose=purpose):
        return method.run(stage, config)


def run_audit(
    method: Method,
    config: Any,
    stage: PartyStage,
    canaries: Canaries,
    evaluation: EvalConfig,
    ledger: Ledger,
    policy: PartyPolicy,
    variant: str = "private",
) -> AuditRun:
    """Run ``method`` once on ``stage.data`` plus the included canaries and bound its epsilon.

    The run reads the party's data, so it is charged to the party's ``ledger`` like any other release;
    a control (noise removed, non-private) is written down as a non-private run.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown audit variant {variant!r}; available: {', '.join(VARIANTS)}")
    epsilon = math.inf if variant == "non-private" else stage.epsilon
    audited = replace(
        stage,
        data=with_canaries(stage.data, canaries),
        epsilon=epsilon,
        label=f"{stage.label} [{variant}]",
    )
    purpose = f"audit of {method.name} ({variant})"
    started = time.perf_counter()
    with noise_removed() if variant == "noise-removed" else nullcontext():
        release = audited_release(method, audited, config, ledger, policy, purpose, control=variant != "private")
    scores = canary_scores(release, canaries, stage.spec, evaluation, stage.device, stage.seed)
    bound = bound_from_scores(scores, canaries.included, stage.delta)
    return AuditRun(variant, release.privacy.epsilon, bound, time.perf_counter() - started, release)


def verdict(runs: list[AuditRun]) -> str:
    """One line a user can act on: a bound above the claim, a weak audit, or a consistent result."""
    private = next((r for r in runs if r.variant == "private"), None)
    controls = [r for r in runs if r.variant != "private"]
    if private and private.bound["epsilon_lower_bound"] > private.claimed_epsilon:
        return (
            f"VIOLATION: empirical epsilon >= {private.bound['epsilon_lower_bound']:.2f} exceeds the "
            f"claimed {private.claimed_epsilon:.3g} at {private.bound['confidence']:.0%} confidence"
        )
    if controls and max(r.bound["epsilon_lower_bound"] for r in controls) < POWERFUL:
        return (
            f"TOO WEAK: no positive control reached an empirical epsilon of {POWERFUL}; this audit "
            "cannot tell a leaking run from a private one here (more canaries, fewer real images, "
            "or a stronger score would be needed)"
        )
    if private:
        return (
            f"consistent: empirical epsilon >= {private.bound['epsilon_lower_bound']:.2f} "
            f"<= claimed {private.claimed_epsilon:.3g}"
            + (", and the positive controls show the audit can detect a leak" if controls else "")
        )
    return "controls only"
