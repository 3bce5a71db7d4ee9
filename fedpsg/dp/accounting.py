"""Privacy accounting: calibrate the Gaussian noise multiplier to an exact (epsilon, delta).

Every DP release in fedpsg is a composition of ``steps`` Poisson-subsampled Gaussian
mechanisms with sampling rate ``sample_rate`` and noise multiplier ``sigma`` (a one-shot
release is ``steps=1, sample_rate=1``). The accountants are Opacus's: RDP (the paper's
choice) with a wide grid of orders, or PRV.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
# Neighbouring datasets: one example added or removed (Opacus, PSG, DP-SGD), replaced by
# another with the dataset size fixed and public (DP-Merf's paper), or a party's whole dataset
# replaced by any other (user-level DP of the federated GAN scenarios).
ADJACENCIES = ("add-remove", "replace-one", "user-level")

# Opacus's default orders stop at 63, where the optimum sits for small epsilons and long runs;
# this grid reaches far enough on both sides that the optimum is interior for the budgets we use.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 20.0 for x in range(1, 20))
    + tuple(2.0 + x / 10.0 for x in range(0, 90))
    + tuple(float(a) for a in range(11, 64))
    + (64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0)
)


@dataclass(frozen=True)
class PrivacyRecord:
    """What a party spent: recorded with every DP output that leaves it."""

    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    sample_rate: float
    accountant: str
    max_grad_norm: float | None = None
    mechanism: str = "subsampled-gaussian"
    adjacency: str = "add-remove"
    # The party's number of private examples. Public metadata, as in Opacus and the paper: it
    # sets the sample rate (n = batch_size / sample_rate), so the record states it openly.
    dataset_size: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PrivacyRecord:
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


def validate_budget(epsilon: float, delta: float) -> None:
    """Reject budgets no accountant can honour (eps = inf means non-private)."""
    if not (epsilon > 0):
        raise ValueError(f"epsilon must be > 0 (or inf for non-private), got {epsilon}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _options(accountant: str, delta: float) -> dict:
    """How precisely each Opacus accountant converts to epsilon: our order grid, or PRV's error bounds."""
    if accountant == "rdp":
        return {"alphas": list(RDP_ORDERS)}
    if accountant == "prv":
        return {"eps_error": 1e-3, "delta_error": delta / 1000}
    raise ValueError(f"unknown accountant {accountant!r}; available: {', '.join(ACCOUNTANTS)}")


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of ``steps`` compositions of the subsampled Gaussian mechanism (Opacus's accountant)."""
    options = _options(accountant, delta)
    if noise_multiplier <= 0:
        return math.inf
    counter = create_accountant(mechanism=accountant)
    counter.history = [(noise_multiplier, sample_rate, steps)]
    return float(counter.get_epsilon(delta=delta, **options))


def best_rdp_order(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The RDP order at which the epsilon bound is attained (tests check it is interior)."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
    return float(rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[1])


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rel_tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier whose run costs ``target_epsilon`` (to ``rel_tol``, never above).

    Opacus's bisection (``get_noise_multiplier``) on our accountant settings; returns 0.0 for
    ``target_epsilon = inf`` (non-private reference runs).
    """
    validate_budget(target_epsilon, delta)
    if math.isinf(target_epsilon):
        return 0.0
    if not (0 < sample_rate <= 1) or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1, got {sample_rate}, {steps}")
    if accountant == "prv":
        rel_tol = max(rel_tol, 1e-3)  # PRV's own discretisation error is of this order
    try:
        high = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=target_epsilon * rel_tol,
            **_options(accountant, delta),
        )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ValueError(f"epsilon={target_epsilon} is unreachable with delta={delta}") from err
    if accountant == "rdp":
        order = best_rdp_order(high, sample_rate, steps, delta)
        if order in (RDP_ORDERS[0], RDP_ORDERS[-1]):
            warnings.warn(f"optimal RDP order {order} is at the edge of the grid; epsilon is loose", stacklevel=2)
    return high


def private_record(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    max_grad_norm: float | None = None,
    mechanism: str = "subsampled-gaussian",
    adjacency: str = "add-remove",
    dataset_size: int | None = None,
) -> PrivacyRecord:
    """Calibrate sigma for a planned run and return the record of what it will spend.

    ``target_epsilon = inf`` records a non-private run (sigma 0, epsilon inf).
    """
    if adjacency not in ADJACENCIES:
        raise ValueError(f"unknown adjacency {adjacency!r}; available: {', '.join(ADJACENCIES)}")
    sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    spent = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
    return PrivacyRecord(
        epsilon=spent,
        delta=delta,
        noise_multiplier=sigma,
        steps=steps,
        sample_rate=sample_rate,
        accountant=accountant,
        max_grad_norm=max_grad_norm,
        mechanism=mechanism,
        adjacency=adjacency,
        dataset_size=dataset_size,
    )
