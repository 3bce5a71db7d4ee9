"""Named hyperparameter profiles: ``paper`` (GPU scale), ``cpu`` (minutes on 2 cores), ``tiny`` (tests).

Every value can be overridden (``with_overrides``), so a profile is a starting point, not a cage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from fedpsg.dpmerf import DPMerfConfig
from fedpsg.dpsgd import DPSGDConfig
from fedpsg.evaluation import EvalConfig
from fedpsg.psg import PSGConfig

SECTIONS = ("psg", "evaluation", "dpsgd", "dpmerf", "dpmerf_evaluation")


@dataclass(frozen=True)
class Profile:
    name: str
    psg: PSGConfig
    evaluation: EvalConfig  # replaying PSG sets (small) and evaluating DP-SGD models
    dpsgd: DPSGDConfig
    dpmerf: DPMerfConfig
    dpmerf_evaluation: EvalConfig  # replaying DP-Merf sets (thousands of samples per class)

    def evaluation_for(self, method: str) -> EvalConfig:
        return self.dpmerf_evaluation if method == "dpmerf" else self.evaluation


PROFILES: dict[str, Profile] = {
    # The paper's continual-learning settings (Section 5.2 and the authors' code).
    "paper": Profile(
        "paper",
        PSGConfig(iterations=200, outer_loop=10, batch_loop=10, inner_loop=50, batch_size=256, width=128),
        EvalConfig(width=128, epochs=1000, augment=True, num_evals=3),
        DPSGDConfig(epochs=5, batch_size=256, max_grad_norm=0.1, lr=0.01),
        DPMerfConfig(num_features=1000, generator_steps=3000, batch_size=100, samples_per_class=6000),
        EvalConfig(width=128, epochs=60, augment=True, num_evals=3),
    ),
    # Small network and fewer runs so a whole scenario takes minutes on 2 CPU cores;
    # sigma is recalibrated to the smaller number of steps, so epsilon is still exact.
    "cpu": Profile(
        "cpu",
        PSGConfig(iterations=10, outer_loop=10, batch_loop=10, inner_loop=50, batch_size=128, width=32),
        EvalConfig(width=32, epochs=300, augment=True, num_evals=2),
        DPSGDConfig(epochs=5, batch_size=256, max_grad_norm=0.1, lr=0.01),
        DPMerfConfig(num_features=1000, generator_steps=1500, batch_size=100, samples_per_class=300),
        EvalConfig(width=32, epochs=40, augment=True, num_evals=2),
    ),
    # Seconds, for tests: still real data, real DP accounting, real gradient matching.
    "tiny": Profile(
        "tiny",
        # A larger image step makes up for the few steps.
        PSGConfig(iterations=2, outer_loop=5, batch_loop=4, inner_loop=10, batch_size=64, width=16, lr_images=1.0),
        EvalConfig(width=16, epochs=300, augment=False, num_evals=2),
        DPSGDConfig(epochs=1, batch_size=256, max_grad_norm=0.1, lr=0.01),
        DPMerfConfig(num_features=500, generator_steps=200, batch_size=100, samples_per_class=50),
        EvalConfig(width=16, epochs=30, augment=False, num_evals=1),
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


def with_overrides(profile: Profile, **sections: dict | None) -> Profile:
    """A copy of ``profile`` with the given (non-None) fields of each section replaced.

    ``with_overrides(p, psg={"iterations": 5}, dpmerf={"samples_per_class": 100})``
    """
    unknown_sections = set(sections) - set(SECTIONS)
    if unknown_sections:
        raise ValueError(f"unknown profile sections {sorted(unknown_sections)}; known: {SECTIONS}")
    changes = {}
    for section, values in sections.items():
        config = getattr(profile, section)
        names = {f.name for f in fields(config)}
        unknown = set(values or {}) - names
        if unknown:
            raise ValueError(f"unknown settings for {type(config).__name__}: {sorted(unknown)}")
        changes[section] = replace(config, **{k: v for k, v in (values or {}).items() if v is not None})
    return replace(profile, **changes)
