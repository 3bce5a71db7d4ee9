"""Settings of a federated GAN scenario: the scenario file, the profile's preset and overrides."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from fedpsg.data.datasets import dataset_spec
from fedpsg.dp.accounting import validate_budget
from fedpsg.io.files import strict_json
from fedpsg.nn.evaluation import EvalConfig
from fedpsg.nn.gan import GANConfig
from fedpsg.runs.scenario import read_scenario, scenario_fields
from fedpsg.runs.settings import (
    RunConfig,
    apply_overrides,
    format_epsilon,
    override_sections,
    resolve_device,
    resolve_profile,
)

KIND = "federated-gan"
METHODS = ("fed-gswgan", "fedavg-gan")
LABELS = {"fed-gswgan": "Fed-GS-WGAN (user-level DP)", "fedavg-gan": "FedAvg-GAN (non-private)"}
SPLITS = ("iid", "by-class")
DEFAULT_ROUND_TIMEOUT = 600.0  # seconds to wait for a round's replies
GAN, EVALUATION = "gan", "evaluation"


@dataclass(frozen=True)
class FedGANConfig(GANConfig):
    """One config for both methods, so that they train the same networks for the same rounds.

    ``pretrain_iterations`` is each party's non-private warm start of its critic (fed-gswgan).
    """

    rounds: int = 20000  # generator steps (fed-gswgan) / averaging rounds (fedavg-gan)
    parties_per_round: int | None = None  # selected cyclically, so every party takes part equally; None = all
    local_steps: int = 5  # fedavg-gan: local GAN iterations per round on the party's data
    samples_per_class: int = 6000  # generated per class to train the evaluation classifiers
    eval_every: int = 2000  # rounds between evaluations (and image grids); the last round always

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [name for name in ("rounds", "local_steps", "samples_per_class", "eval_every") if getattr(self, name) < 1]
        if self.parties_per_round is not None and self.parties_per_round < 1:
            bad.append("parties_per_round")
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")


PRESETS: dict[str, FedGANConfig] = {
    # GS-WGAN's settings (DingfanChen/GS-WGAN, source/config.py): a GPU job.
    "paper": FedGANConfig(),
    # Minutes on 2 cores: narrow networks, one critic update per round, faster learning rates.
    "cpu": FedGANConfig(
        rounds=500,
        batch_size=16,
        critic_iterations=1,
        pretrain_iterations=50,
        local_steps=2,
        lr_generator=1e-3,
        lr_discriminator=1e-3,
        generator_width=16,
        critic_width=16,
        samples_per_class=300,
        eval_every=250,  # an evaluation (2 classifiers on 3000 images) costs ~90 s, a round ~0.4 s
    ),
    # Seconds, for tests.
    "tiny": FedGANConfig(
        rounds=2,
        batch_size=8,
        critic_iterations=1,
        pretrain_iterations=1,
        local_steps=1,
        lr_generator=1e-3,
        lr_discriminator=1e-3,
        generator_width=8,
        critic_width=8,
        ema_decay=0.9,
        samples_per_class=10,
        eval_every=1,
    ),
}

# Hundreds to thousands of generated images per class: DP-Merf's and GS-WGAN's evaluation.
EVALUATIONS: dict[str, EvalConfig] = {
    "paper": EvalConfig(width=128, epochs=60, augment=True, num_evals=3),
    "cpu": EvalConfig(width=32, epochs=40, augment=True, num_evals=2),
    "tiny": EvalConfig(width=16, epochs=5, augment=False, num_evals=1),
}


@dataclass(frozen=True)
class FedGANScenario:
    """A ``kind: federated-gan`` scenario file."""

    name: str
    dataset: str
    parties: int = 5
    split: str = "iid"  # iid: a random equal share of every class; by-class: parties hold disjoint classes
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    epsilon: float = 10.0  # each party's user-level budget (its whole dataset is the unit)
    delta: float = 1e-5
    profile: str | None = None
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        dataset_spec(self.dataset)
        if self.parties < 1:
            raise ValueError(f"parties must be >= 1, got {self.parties}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"methods of a federated-gan scenario: a non-empty subset of {METHODS}, got {self.methods}"
            )
        validate_budget(self.epsilon, self.delta)


def read_federated_scenario(path: Path, values: Mapping[str, Any]) -> FedGANScenario:
    scenario = FedGANScenario(**scenario_fields(path, values, FedGANScenario))
    scenario.validate()
    return scenario


@dataclass(frozen=True)
class FedGANSettings:
    scenario: FedGANScenario
    profile: str
    config: FedGANConfig
    evaluation: EvalConfig
    seed: int
    device: str
    out: Path
    data_dir: str | None = None
    round_timeout: float = DEFAULT_ROUND_TIMEOUT
    round_retries: int = 2  # re-sends of a round none of whose parties answered

    @property
    def epsilon(self) -> float:
        return self.scenario.epsilon

    @property
    def delta(self) -> float:
        return self.scenario.delta

    @property
    def methods(self) -> list[str]:
        return self.scenario.methods

    @property
    def num_partitions(self) -> int:
        return self.scenario.parties

    results_axis: ClassVar[str] = "round"  # results.csv's x column

    @property
    def title(self) -> str:
        """The run's reports' and plots' title."""
        return f"{self.scenario.name}: {self.num_partitions} parties, {self.scenario.split}"

    @property
    def method_labels(self) -> dict[str, str]:
        return {m: LABELS[m] for m in self.methods}

    @property
    def parties_per_round(self) -> int:
        return min(self.config.parties_per_round or self.scenario.parties, self.scenario.parties)

    def identity(self) -> dict:
        scenario = {k: v for k, v in asdict(self.scenario).items() if k not in ("methods", "overrides")}
        return strict_json(
            {
                "kind": KIND,
                "scenario": scenario,
                "profile": self.profile,
                "seed": self.seed,
                GAN: asdict(self.config),
                EVALUATION: asdict(self.evaluation),
            }
        )

    def run_id(self) -> str:
        """Names the parties' ledgers for this run: stable across resumes, different for other settings."""
        text = json.dumps({**self.identity(), "out": str(self.out.resolve())}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_federated_settings(
    scenario: FedGANScenario,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    parties: int | None = None,
    split: str | None = None,
    methods: list[str] | None = None,
    profile: str | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | Path | None = None,
    data_dir: str | None = None,
    round_timeout: float = DEFAULT_ROUND_TIMEOUT,
    overrides: Mapping[str, Any] | Iterable[str] | str | None = None,
) -> FedGANSettings:
    """Merge scenario file, profile preset and overrides (``gan.KEY=V``, ``evaluation.KEY=V``)."""
    chosen = replace(
        scenario,
        epsilon=epsilon if epsilon is not None else scenario.epsilon,
        delta=delta if delta is not None else scenario.delta,
        parties=parties if parties is not None else scenario.parties,
        split=split or scenario.split,
        methods=list(methods) if methods else list(scenario.methods),
    )
    chosen.validate()
    if round_timeout <= 0:
        raise ValueError("round timeout must be > 0 seconds")
    device = resolve_device(device)
    profile = resolve_profile(profile, chosen.profile, device)
    sections = override_sections(chosen.overrides, overrides, (GAN, EVALUATION))
    config = apply_overrides(PRESETS[profile], sections.get(GAN, {}), GAN)
    evaluation = apply_overrides(EVALUATIONS[profile], sections.get(EVALUATION, {}), EVALUATION)
    if out is None:
        out = Path("runs") / f"{chosen.name}-{chosen.split}-{chosen.parties}p-eps{format_epsilon(chosen.epsilon)}"
    return FedGANSettings(
        scenario=chosen,
        profile=profile,
        config=config,
        evaluation=evaluation,
        seed=seed,
        device=device,
        out=Path(out),
        data_dir=data_dir,
        round_timeout=round_timeout,
    )


def federated_settings_from_run_config(config: Mapping[str, Any]) -> FedGANSettings:
    """A federated GAN run's settings from Flower run-config values ("" means: the default); the
    continual runs' keys (spc, replay, stages, stage timeouts) are not read."""
    values = RunConfig(config)
    path, scenario = read_scenario(values.get("scenario"))
    return resolve_federated_settings(
        read_federated_scenario(path, scenario),
        parties=values.get("parties", int),
        split=values.get("split"),
        round_timeout=values.get("round-timeout", float) or DEFAULT_ROUND_TIMEOUT,
        **values.common(),
    )


def round_parties(round_index: int, per_round: int, num_parties: int) -> list[int]:
    """The partitions asked in round ``round_index`` (0-based): the next ``per_round`` in cyclic order.

    Cyclic selection spreads participation evenly: no party takes part more than
    :func:`participations_per_party` times, which is what each party's noise is calibrated for.
    """
    return [(round_index * per_round + j) % num_parties for j in range(per_round)]


def participations_per_party(rounds: int, per_round: int, num_parties: int) -> int:
    """The most rounds any one party takes part in under :func:`round_parties`."""
    return -(-rounds * per_round // num_parties)
