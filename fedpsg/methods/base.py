"""The method plug-in interface and its registry.

A method is what a party runs on its private data in one stage, and what it releases: a DP
synthetic set (PSG, DP-Merf, dpdm) or a DP-trained model (DP-SGD). Everything else in fedpsg
(settings, the ClientApp, the coordinator, results, CLIs) asks the registry, never a name.

Adding one (see ``fedpsg/methods/psg.py`` for a full example)::

    @register_method                                 # the one registration line
    class MyMethod(Method):
        name = "mine"
        label = "My method"
        releases = "synthetic"
        config_class = MyConfig                      # a frozen dataclass, validated in __post_init__
        presets = {"paper": MyConfig(...), "cpu": MyConfig(...), "tiny": MyConfig(...)}
        evaluation = {"paper": EvalConfig(...), "cpu": EvalConfig(...), "tiny": EvalConfig(...)}

        def plan(self, stage: PartyStage, config: MyConfig) -> PrivacyRecord:
            ...                                      # what a release will spend, from public sizes only

        def steps(self, stage: PartyStage, config: MyConfig) -> int:
            ...                                      # progress units of one release

        def release(
            self, stage: PartyStage, config: MyConfig, plan: PrivacyRecord, secret: SecretRandomness, progress: Progress
        ) -> Release:
            ...                                      # at ``plan``'s noise; DP randomness from ``secret`` only

Callers use ``run()``, which the base class owns: a fresh secret unless one is given, progress
lines, and the checks that the release is of the declared kind and spends what ``plan`` said.

A built-in method's module is imported by ``fedpsg/methods/__init__.py``; a plug-in's module by
``FEDPSG_PLUGINS``.

Plug-in modules outside fedpsg are imported on first lookup from ``FEDPSG_PLUGINS`` (comma-
separated module names), which also reaches Ray actors and SuperNodes through the environment.
"""

from __future__ import annotations

import importlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, final

import torch
from torch import nn

from fedpsg.data.datasets import DatasetSpec, ImageSet
from fedpsg.dp.accounting import PrivacyRecord
from fedpsg.dp.secret import SecretRandomness
from fedpsg.io.progress import Progress
from fedpsg.nn.evaluation import EvalConfig

PROFILES = ("paper", "cpu", "tiny")
RELEASES = ("synthetic", "model")
PLUGINS_ENV = "FEDPSG_PLUGINS"


@dataclass(frozen=True)
class PartyStage:
    """Everything a method gets for one stage on one party."""

    data: ImageSet  # the party's private images (normalised), only of ``classes``
    classes: list[int]
    spec: DatasetSpec
    epsilon: float
    delta: float
    seed: int = 0  # public: initialisations and post-processing, never the DP randomness
    model: nn.Module | None = None  # the coordinator's current model (a method that releases a model finetunes it)
    device: str = "cpu"
    label: str = ""  # prefix of progress lines, e.g. "[party 1] psg stage 2"
    progress_interval: float = 10.0
    earlier: ImageSet | None = None  # earlier stages' DP sets of this method (if it uses_earlier_sets)
    data_dir: str | None = None  # dataset root on the party's machine, for public data (None: FEDPSG_DATA_DIR)

    def progress(self, total: int) -> Progress:
        return Progress(self.label, total, interval=self.progress_interval)


@dataclass(frozen=True)
class Release:
    """What leaves the party: a DP synthetic set, or a DP-trained model, and the privacy record."""

    privacy: PrivacyRecord
    images: torch.Tensor | None = None  # normalised like the real data
    labels: torch.Tensor | None = None  # original class ids
    model_state: dict[str, torch.Tensor] | None = None


class Method(ABC):
    name: ClassVar[str]
    label: ClassVar[str]  # legend of plots and tables
    releases: ClassVar[str]  # one of RELEASES
    config_class: ClassVar[type]
    presets: ClassVar[Mapping[str, Any]]  # profile name -> config
    evaluation: ClassVar[Mapping[str, EvalConfig]]  # profile name -> how the coordinator evaluates it
    uses_earlier_sets: ClassVar[bool] = False  # receive the earlier stages' DP sets with the model

    @abstractmethod
    def plan(self, stage: PartyStage, config: Any) -> PrivacyRecord:
        """What a release will spend (its mechanism's noise, sample rate and steps), without running it.

        The party writes this to its lifetime ledger before ``run`` touches the data, and ``run``
        checks that the release's record matches it. Only public facts may be used: sizes, the
        config, the budget.
        """

    @abstractmethod
    def steps(self, stage: PartyStage, config: Any) -> int:
        """How many progress steps one release takes (the ``progress`` given to ``release``)."""

    @abstractmethod
    def release(
        self, stage: PartyStage, config: Any, plan: PrivacyRecord, secret: SecretRandomness, progress: Progress
    ) -> Release:
        """The method itself: compute the release from ``stage`` with the mechanism ``plan`` describes
        (what :meth:`plan` returned), drawing all DP randomness from ``secret``."""

    @final
    def run(
        self,
        stage: PartyStage,
        config: Any,
        secret: SecretRandomness | None = None,
        *,
        planned: PrivacyRecord | None = None,
    ) -> Release:
        """Run on the party's data; DP randomness from ``secret`` (default: fresh OS entropy).

        ``planned``: this stage's :meth:`plan`, when the caller has it already (the record the
        party's ledger holds; calibrating the noise again would take seconds). A release that is
        not of the declared kind, or whose mechanism differs from the plan, raises: it must not
        leave the party.
        """
        planned = planned if planned is not None else self.plan(stage, config)
        secret = secret if secret is not None else SecretRandomness.fresh(stage.device)
        release = self.release(stage, config, planned, secret, stage.progress(self.steps(stage, config)))
        if self.releases == "synthetic" and (release.images is None or release.labels is None):
            raise RuntimeError(f"{self.name} declares a synthetic release but returned no images")
        if self.releases == "model" and release.model_state is None:
            raise RuntimeError(f"{self.name} declares a model release but returned no model")
        check_as_planned(self.name, planned, release.privacy)
        return release


def check_as_planned(method: str, planned: PrivacyRecord, spent: PrivacyRecord) -> None:
    """A release whose mechanism differs from what the party's ledger holds must not leave the party."""
    same = (
        math.isclose(planned.noise_multiplier, spent.noise_multiplier, rel_tol=1e-9)
        and math.isclose(planned.sample_rate, spent.sample_rate, rel_tol=1e-12)
        and planned.steps == spent.steps
        and planned.adjacency == spent.adjacency
    )
    if not same:
        raise RuntimeError(f"{method} spent {spent} but planned {planned}: the release is withheld")


_REGISTRY: dict[str, Method] = {}


M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: add one instance of the method to the registry (checked: a preset and an
    evaluation for every profile, a known release kind, presets of its config class)."""
    method = cls()
    missing = [p for p in PROFILES if p not in method.presets or p not in method.evaluation]
    if missing:
        raise ValueError(f"method {method.name!r} lacks presets or evaluation for profiles {missing}")
    if method.releases not in RELEASES:
        raise ValueError(f"method {method.name!r}: releases must be one of {RELEASES}, got {method.releases!r}")
    if not all(isinstance(c, method.config_class) for c in method.presets.values()):
        raise TypeError(f"method {method.name!r}: presets must be {method.config_class.__name__} instances")
    _REGISTRY[method.name] = method
    return cls


def _load_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(module)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    _load_plugins()
    return list(_REGISTRY)
