"""Named hyperparameter profiles: ``paper`` (GPU scale), ``cpu`` (minutes on 2 cores), ``tiny`` (tests).

Every value can be overridden (``with_overrides``), so a profile is a starting point, not a cage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from fedpsg.evaluation import EvalConfig
from fedpsg.psg import PSGConfig


@dataclass(frozen=True)
class Profile:
    name: str
    psg: PSGConfig
    evaluation: EvalConfig


PROFILES: dict[str, Profile] = {
    # The paper's continual-learning settings (Section 5.2 and the authors' configs).
    "paper": Profile(
        "paper",
        PSGConfig(iterations=200, outer_loop=10, batch_loop=10, inner_loop=50, batch_size=256, width=128),
        EvalConfig(width=128, epochs=1000, augment=True, num_evals=3),
    ),
    # Small network and fewer runs so a stage takes about two minutes on 2 CPU cores;
    # sigma is recalibrated to the smaller number of steps, so epsilon is still exact.
    "cpu": Profile(
        "cpu",
        PSGConfig(iterations=10, outer_loop=10, batch_loop=10, inner_loop=50, batch_size=128, width=32),
        EvalConfig(width=32, epochs=300, augment=True, num_evals=2),
    ),
    # Seconds, for tests: still real data, real DP accounting, real gradient matching.
    "tiny": Profile(
        "tiny",
        # A larger image step makes up for the few steps.
        PSGConfig(iterations=2, outer_loop=5, batch_loop=4, inner_loop=10, batch_size=64, width=16, lr_images=1.0),
        EvalConfig(width=16, epochs=300, augment=False, num_evals=2),
    ),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_profile_name(device: str | None = None) -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if (device or default_device()).startswith("cuda") else "cpu"


def get_profile(name: str | None = None, device: str | None = None) -> Profile:
    name = name or default_profile_name(device)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(PROFILES)}")
    return PROFILES[name]


def with_overrides(profile: Profile, psg: dict | None = None, evaluation: dict | None = None) -> Profile:
    """A copy of ``profile`` with the given (non-None) fields replaced."""

    def pick(config: object, values: dict | None) -> dict:
        names = {f.name for f in fields(config)}
        unknown = set(values or {}) - names
        if unknown:
            raise ValueError(f"unknown settings for {type(config).__name__}: {sorted(unknown)}")
        return {k: v for k, v in (values or {}).items() if v is not None}

    return replace(
        profile,
        psg=replace(profile.psg, **pick(profile.psg, psg)),
        evaluation=replace(profile.evaluation, **pick(profile.evaluation, evaluation)),
    )
