"""Scenarios: readable YAML files under ``scenarios/`` describing a continual-learning run.

Adding a scenario is adding a file; ``--scenario NAME`` finds ``scenarios/NAME.yaml`` and
``--scenario path/to/file.yaml`` reads that file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedpsg.data.datasets import DEFAULT_VALIDATION_PER_CLASS, dataset_spec, stage_classes, validate_classes
from fedpsg.methods import get_method, method_names

SCENARIO_DIRS_ENV = "FEDPSG_SCENARIO_DIR"
REPLAY_MODES = ("fresh", "continue")
CONTINUAL = "continual"  # kind of the stage-by-stage scenarios; see scenario_kind


def scenario_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(SCENARIO_DIRS_ENV, "").split(os.pathsep) if p]
    return [*dirs, Path.cwd() / "scenarios", Path(__file__).resolve().parents[2] / "scenarios"]


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset: str
    class_order: list[int]
    classes_per_stage: int = 2
    methods: list[str] = field(default_factory=method_names)  # default: every registered method
    spc: int = 10
    epsilon: float = 10.0
    delta: float = 1e-5
    profile: str | None = None
    replay: str = "fresh"
    # Training images per class the evaluator holds out (fedpsg.data.datasets.load_split): no
    # party holds them; hyperparameters are chosen on them, never on the test images.
    validation_per_class: int = DEFAULT_VALIDATION_PER_CLASS
    overrides: dict = field(default_factory=dict)  # the file's ``set:``, as dotted keys (see fedpsg.runs.settings)

    @property
    def stages(self) -> list[list[int]]:
        return stage_classes(self.class_order, self.classes_per_stage)

    def validate(self) -> None:
        spec = dataset_spec(self.dataset)
        validate_classes(self.class_order, spec.num_classes)
        _ = self.stages
        if not self.methods:
            raise ValueError("a scenario needs at least one method")
        for method in self.methods:
            get_method(method)  # raises on an unknown name, listing the registered ones
        if self.validation_per_class < 0:
            raise ValueError(f"validation_per_class must be >= 0, got {self.validation_per_class}")
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"replay must be one of {REPLAY_MODES}, got {self.replay!r}")


def flatten_overrides(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A ``set:`` mapping, nested (``psg: {iterations: 20}``) or dotted, as dotted keys."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def available_scenarios() -> list[str]:
    return sorted({p.stem for d in scenario_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def scenario_path(name_or_path: str) -> Path:
    """``scenarios/NAME.yaml`` from the scenario folders, or the YAML file given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidates = [d / f"{name_or_path}.yaml" for d in scenario_dirs()]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ValueError(
            f"unknown scenario {name_or_path!r}; available: {', '.join(available_scenarios()) or '(none found)'}"
        )
    return found


def read_scenario(name_or_path: str) -> tuple[Path, dict]:
    path = scenario_path(name_or_path)
    return path, yaml.safe_load(path.read_text()) or {}


def scenario_kind(name_or_path: str) -> str:
    """``continual`` (the default) or ``federated-gan`` (fedpsg.federated_gan)."""
    _, values = read_scenario(name_or_path)
    return str(values.get("kind", CONTINUAL))


def scenario_fields(path: Path, values: Mapping[str, Any], scenario_class: type) -> dict[str, Any]:
    """A scenario file's values as ``scenario_class``'s keyword arguments (``name`` and
    ``overrides`` included), after rejecting keys the class does not know."""
    values = {k: v for k, v in values.items() if k != "kind"}
    known = (set(scenario_class.__dataclass_fields__) - {"name", "overrides"}) | {"set"}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    overrides = flatten_overrides(values.pop("set", None) or {})
    return {"name": path.stem, "overrides": overrides, **values}


def load_scenario(name_or_path: str) -> Scenario:
    path, values = read_scenario(name_or_path)
    kind = values.get("kind", CONTINUAL)
    if kind != CONTINUAL:
        raise ValueError(f"{path} is a {kind} scenario, not a continual one; run it with python -m fedpsg.simulate")
    fields = scenario_fields(path, values, Scenario)
    scenario = Scenario(**{k: v for k, v in fields.items() if v is not None or k == "profile"})
    scenario.validate()
    return scenario
