"""A run's settings, resolved in one place: scenario file + profile + method presets + overrides.

Every entry point reaches every setting the same way:

* ``python -m fedpsg.simulate|generate|deploy ... --set psg.iterations=20 dpmerf.samples_per_class=600``
* ``flwr run . --run-config 'set="psg.iterations=20 dpmerf.samples_per_class=600"'``
* ``SET="psg.iterations=20" docker compose up``
* a scenario file's ``set:`` mapping (``psg.iterations: 20``); the command line wins.

An override is ``SECTION.KEY=VALUE``: SECTION is a method's name (its config) or
``METHOD.evaluation`` (how the coordinator evaluates it), or ``evaluation`` for every method's
evaluation at once; VALUE is read as YAML (``20``, ``0.5``, ``true``, ``null``, ``text``) and
checked against the field's type. Everything is validated before any work starts, with a
one-line error.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from fedpsg.dp.accounting import validate_budget
from fedpsg.io.files import strict_json
from fedpsg.methods import PROFILES, get_method
from fedpsg.nn.evaluation import EvalConfig
from fedpsg.runs.scenario import REPLAY_MODES, Scenario, load_scenario

DEFAULT_SCENARIO = "split_fmnist"
DEFAULT_STAGE_TIMEOUT = 3600.0  # seconds the coordinator waits for one party's reply
DEFAULT_RECONNECT_TIMEOUT = 600.0  # seconds to wait for a vanished party to come back
DEFAULT_STAGE_RETRIES = 2  # times a stage is re-sent after its party vanished
EVALUATION = "evaluation"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_profile(device: str | None = None) -> str:
    """``paper`` on a GPU, ``cpu`` otherwise."""
    return "paper" if (device or default_device()).startswith("cuda") else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` (cpu or cuda[:N]), else cuda if available, else cpu."""
    device = device or default_device()
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    return device


def resolve_profile(profile: str | None, scenario_profile: str | None, device: str) -> str:
    """The command line's profile, else the scenario file's, else the device's default."""
    profile = profile or scenario_profile or default_profile(device)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {', '.join(PROFILES)}")
    return profile


def format_epsilon(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_title(scenario: str, epsilon: float, delta: float) -> str:
    """The title of a continual run's reports and plots."""
    return f"{scenario}: ε={format_epsilon(epsilon).replace('inf', '∞')}, δ={delta:g}"


def parse_epsilons(text: str | float) -> list[float]:
    """``10``, ``inf`` or a sweep ``1,10``; each must be > 0."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError as err:
        raise ValueError(f"eps must be numbers > 0 or inf, comma-separated; got {text!r}") from err
    if not values or not all(v > 0 for v in values):
        raise ValueError(f"eps must be > 0 (or inf), got {text!r}")
    return values


def parse_methods(text: str | None) -> list[str] | None:
    """``psg, dpsgd`` -> ``["psg", "dpsgd"]``; None (the scenario's methods) if empty."""
    methods = [m.strip() for m in (text or "").split(",") if m.strip()]
    return methods or None


def parse_overrides(items: Iterable[str] | str | None) -> dict[str, Any]:
    """``["psg.iterations=20", ...]`` (or one space-separated string) -> ``{"psg.iterations": 20}``."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = items.split()
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or "." not in name:
            raise ValueError(f"--set takes SECTION.KEY=VALUE (e.g. psg.iterations=20), got {item!r}")
        overrides[name.strip()] = yaml.safe_load(text) if text.strip() else None
    return overrides


def _coerce(config_class: type, key: str, value: Any) -> Any:
    """``value`` as the type of ``config_class.key`` (ints stay ints, numbers become floats, ...)."""
    hint = typing.get_type_hints(config_class)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ValueError(f"expected {names}, got {value!r}")


def config_from_hyperparameters(config_class: type, values: dict):
    """Rebuild a frozen config dataclass from a request's hyperparameters (unknown keys rejected)."""
    names = {f.name for f in fields(config_class)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} settings in request: {sorted(unknown)}")
    return config_class(**values)


def apply_overrides(config: Any, values: Mapping[str, Any], section: str) -> Any:
    """A copy of the dataclass ``config`` with ``values`` set, type-checked and validated."""
    names = {f.name for f in fields(config)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown setting {section}.{key}; {section} has: {', '.join(sorted(names))}")
        try:
            changes[key] = _coerce(type(config), key, value)
        except ValueError as err:
            raise ValueError(f"{section}.{key}={value!r}: {err}") from None
    try:
        return replace(config, **changes)
    except ValueError as err:
        raise ValueError(f"{section}: {err}") from None


def method_sections(methods: Iterable[str]) -> set[str]:
    """The settings sections of ``methods``: each one's config and evaluation, and every method's evaluation."""
    return {EVALUATION, *methods, *(f"{m}.{EVALUATION}" for m in methods)}


def split_sections(overrides: Mapping[str, Any], known: Collection[str]) -> dict[str, dict[str, Any]]:
    """Group dotted overrides by section; a section not in ``known`` is an error."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        section, _, key = name.rpartition(".")
        if section not in known:
            raise ValueError(f"unknown settings section {section!r} in {name!r}; known: {', '.join(sorted(known))}")
        sections.setdefault(section, {})[key] = value
    return sections


def override_sections(
    scenario_overrides: Mapping[str, Any],
    overrides: Mapping[str, Any] | Iterable[str] | str | None,
    known: Collection[str],
) -> dict[str, dict[str, Any]]:
    """The scenario file's ``set:``, then ``overrides`` (parsed if text; they win), by section."""
    if overrides is None or isinstance(overrides, (str, list, tuple)):
        overrides = parse_overrides(overrides)
    return split_sections({**scenario_overrides, **overrides}, known)


def method_settings(
    method: str, profile: str, sections: Mapping[str, Mapping[str, Any]], spc: int | None = None
) -> tuple[Any, EvalConfig]:
    """A method's config and evaluation for ``profile``, with the overrides applied."""
    plugin = get_method(method)
    config = plugin.presets[profile]
    if spc is not None and "spc" in {f.name for f in fields(config)}:
        config = apply_overrides(config, {"spc": spc}, method)
    config = apply_overrides(config, sections.get(method, {}), method)
    evaluation = apply_overrides(plugin.evaluation[profile], sections.get(EVALUATION, {}), EVALUATION)
    evaluation = apply_overrides(evaluation, sections.get(f"{method}.{EVALUATION}", {}), f"{method}.{EVALUATION}")
    return config, evaluation


@dataclass(frozen=True)
class RunSettings:
    scenario: Scenario
    profile: str
    epsilon: float
    delta: float
    methods: list[str]
    configs: dict[str, Any]  # method -> its config dataclass
    evaluations: dict[str, EvalConfig]  # method -> how the coordinator evaluates it
    num_stages: int
    seed: int
    device: str
    out: Path
    replay: str
    data_dir: str | None = None  # the coordinator's root for the public test images
    stage_timeout: float = DEFAULT_STAGE_TIMEOUT
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    stage_retries: int = DEFAULT_STAGE_RETRIES
    # The partition id of stage 1's party: repetitions run side by side in one simulation address
    # parties of their own (fedpsg.simulation.place_repetitions). Not part of the results.
    first_partition: int = 0

    @property
    def stages(self) -> list[list[int]]:
        return self.scenario.stages[: self.num_stages]

    def partition(self, stage: int) -> int:
        """The partition id of the party that holds ``stage``'s classes."""
        return self.first_partition + stage - 1

    @property
    def num_partitions(self) -> int:
        return len(self.scenario.stages)

    results_axis: ClassVar[str] = "stage"  # results.csv's x column

    @property
    def title(self) -> str:
        """The run's reports' and plots' title."""
        return run_title(self.scenario.name, self.epsilon, self.delta)

    @property
    def method_labels(self) -> dict[str, str]:
        return {m: get_method(m).label for m in self.methods}

    def identity(self) -> dict:
        """What identifies the run's results: a resumed run must match it.

        Methods are kept apart: each method's stages are independent, so a run can be resumed
        with more methods than it started with (only the methods in both must agree).
        """
        scenario = {k: v for k, v in asdict(self.scenario).items() if k not in ("methods", "overrides")}
        return strict_json(
            {
                "scenario": scenario,
                "profile": self.profile,
                "epsilon": self.epsilon,
                "delta": self.delta,
                "seed": self.seed,
                "replay": self.replay,
                "methods": {
                    m: {"config": asdict(self.configs[m]), EVALUATION: asdict(self.evaluations[m])}
                    for m in self.methods
                },
            }
        )


def resolve_settings(
    scenario: str = DEFAULT_SCENARIO,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    spc: int | None = None,
    profile: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    stages: int | None = None,
    device: str | None = None,
    methods: list[str] | None = None,
    replay: str | None = None,
    data_dir: str | None = None,
    stage_timeout: float = DEFAULT_STAGE_TIMEOUT,
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    stage_retries: int = DEFAULT_STAGE_RETRIES,
    overrides: Mapping[str, Any] | Iterable[str] | str | None = None,
) -> RunSettings:
    """Merge scenario file, profile, method presets and overrides; raise ValueError on anything invalid."""
    base = load_scenario(scenario)
    chosen = replace(
        base,
        spc=spc if spc is not None else base.spc,
        epsilon=epsilon if epsilon is not None else base.epsilon,
        delta=delta if delta is not None else base.delta,
        methods=list(methods) if methods else list(base.methods),
        replay=replay or base.replay,
    )
    chosen.validate()
    validate_budget(chosen.epsilon, chosen.delta)
    if chosen.spc < 1:
        raise ValueError(f"spc must be >= 1, got {chosen.spc}")
    if stages is not None and not 1 <= stages <= len(base.stages):
        raise ValueError(f"stages must be in 1..{len(base.stages)}, got {stages}")
    if stage_timeout <= 0 or reconnect_timeout <= 0 or stage_retries < 0:
        raise ValueError("stage and reconnect timeouts must be > 0 seconds, stage retries >= 0")
    device = resolve_device(device)
    profile = resolve_profile(profile, chosen.profile, device)
    sections = override_sections(chosen.overrides, overrides, method_sections(chosen.methods))
    resolved = {m: method_settings(m, profile, sections, chosen.spc) for m in chosen.methods}
    if out is None:
        out = Path("runs") / f"{chosen.name}-eps{format_epsilon(chosen.epsilon)}"
    assert chosen.replay in REPLAY_MODES
    return RunSettings(
        scenario=chosen,
        profile=profile,
        epsilon=chosen.epsilon,
        delta=chosen.delta,
        methods=chosen.methods,
        configs={m: config for m, (config, _) in resolved.items()},
        evaluations={m: evaluation for m, (_, evaluation) in resolved.items()},
        num_stages=stages or len(base.stages),
        seed=seed,
        device=device,
        out=Path(out),
        replay=chosen.replay,
        data_dir=data_dir,
        stage_timeout=stage_timeout,
        reconnect_timeout=reconnect_timeout,
        stage_retries=stage_retries,
    )


# Keys of ``[tool.flwr.app.config]`` / ``flwr run --run-config``: the flags of fedpsg.simulate, and
# two that fedpsg.simulate sets for a simulation on one machine (see server/app.py).
RUN_CONFIG_KEYS = (
    "scenario", "eps", "delta", "spc", "methods", "profile", "replay", "seed", "stages", "device", "out",
    "data-dir", "stage-timeout", "reconnect-timeout", "stage-retries", "set", "repeats", "parallel-jobs",
    "parties", "split", "round-timeout", "repeats-together", "evaluation-threads",
)  # fmt: skip
FEDERATED_GAN_RUN_CONFIG_KEYS = ("parties", "split", "round-timeout")  # continual runs leave them ""


def as_bool(value: Any) -> bool:
    """A run-config boolean: TOML's true/false, or the words a shell gives."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if str(value).lower() not in words:
        raise ValueError(f"expected true or false, got {value!r}")
    return words[str(value).lower()]


class RunConfig:
    """Flower run-config values, where "" (or a missing key) means: the scenario's / profile's default."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - set(RUN_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown run-config keys {sorted(unknown)}; known: {', '.join(RUN_CONFIG_KEYS)}")
        self.config = config

    def get(self, key: str, convert: Callable[[Any], Any] = str) -> Any:
        value = self.config.get(key)
        return None if value in ("", None) else convert(value)

    def positive_int(self, key: str, default: int) -> int:
        """``key`` (``repeats``, ``parallel-jobs``) as an int >= 1; ``default`` if absent or ""."""
        number = self.get(key, int)
        number = default if number is None else number
        if number < 1:
            raise ValueError(f"{key} must be >= 1, got {number}")
        return number

    def epsilon(self) -> float | None:
        epsilons = self.get("eps", parse_epsilons)
        if epsilons is not None and len(epsilons) != 1:
            raise ValueError("a Flower run takes one eps; run a sweep with python -m fedpsg.simulate --eps 1,10")
        return epsilons[0] if epsilons else None

    def common(self) -> dict[str, Any]:
        """What both scenario kinds read, as keyword arguments of either kind's ``resolve_*settings``."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.get("delta", float),
            "methods": self.get("methods", parse_methods),
            "profile": self.get("profile"),
            "seed": self.get("seed", int) or 0,
            "device": self.get("device"),
            "out": self.get("out"),
            "data_dir": self.get("data-dir"),
            "overrides": self.get("set") or "",
        }


def settings_from_run_config(config: Mapping[str, Any]) -> RunSettings:
    """A continual run's RunSettings from Flower run-config values ("" means: the default)."""
    values = RunConfig(config)
    given = [key for key in FEDERATED_GAN_RUN_CONFIG_KEYS if values.get(key) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: for federated-gan scenarios only")
    retries = values.get("stage-retries", int)
    return resolve_settings(
        values.get("scenario") or DEFAULT_SCENARIO,
        spc=values.get("spc", int),
        stages=values.get("stages", int),
        replay=values.get("replay"),
        stage_timeout=values.get("stage-timeout", float) or DEFAULT_STAGE_TIMEOUT,
        reconnect_timeout=values.get("reconnect-timeout", float) or DEFAULT_RECONNECT_TIMEOUT,
        stage_retries=DEFAULT_STAGE_RETRIES if retries is None else retries,
        **values.common(),
    )
