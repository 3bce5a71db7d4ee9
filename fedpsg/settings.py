"""A fully resolved run: scenario + profile + command-line overrides, validated up front."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedpsg.cli import format_epsilon
from fedpsg.privacy import validate_budget
from fedpsg.profiles import SECTIONS, Profile, default_device, get_profile, with_overrides
from fedpsg.scenario import METHODS, REPLAY_MODES, Scenario, load_scenario


@dataclass(frozen=True)
class RunSettings:
    scenario: Scenario
    profile: Profile
    epsilon: float
    delta: float
    methods: list[str]
    num_stages: int
    seed: int
    device: str
    out: Path
    replay: str
    stage_timeout: float  # seconds the coordinator waits for one party's reply
    data_dir: str | None = None  # the coordinator's root for the public test images
    reconnect_timeout: float = 600.0  # seconds to wait for a vanished party to come back
    stage_retries: int = 2  # times a stage is re-sent after its party vanished

    @property
    def stages(self) -> list[list[int]]:
        return self.scenario.stages[: self.num_stages]

    @property
    def num_partitions(self) -> int:
        return len(self.scenario.stages)

    def to_dict(self) -> dict:
        """What identifies the run's results (a resumed run must match it).

        The methods are not part of it: each method's stages are independent, so a run can be
        resumed with more methods than it started with.
        """
        return {
            "scenario": {k: v for k, v in asdict(self.scenario).items() if k != "methods"},
            "profile": asdict(self.profile),
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else "inf",
            "delta": self.delta,
            "seed": self.seed,
            "replay": self.replay,
        }


def resolve_settings(
    scenario: str,
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
    stage_timeout: float = 3600.0,
    data_dir: str | None = None,
    reconnect_timeout: float = 600.0,
    stage_retries: int = 2,
    overrides: dict[str, dict] | None = None,
) -> RunSettings:
    """Merge scenario file and overrides; raise ValueError on anything invalid, before any work."""
    base = load_scenario(scenario)
    scenario_obj = replace(
        base,
        spc=spc if spc is not None else base.spc,
        epsilon=epsilon if epsilon is not None else base.epsilon,
        delta=delta if delta is not None else base.delta,
        methods=list(methods) if methods else list(base.methods),
        replay=replay or base.replay,
    )
    scenario_obj.validate()
    validate_budget(scenario_obj.epsilon, scenario_obj.delta)
    if scenario_obj.spc < 1:
        raise ValueError(f"spc must be >= 1, got {scenario_obj.spc}")
    if stages is not None and not 1 <= stages <= len(base.stages):
        raise ValueError(f"--stages must be in 1..{len(base.stages)}, got {stages}")
    if stage_timeout <= 0 or reconnect_timeout <= 0 or stage_retries < 0:
        raise ValueError("stage and reconnect timeouts must be > 0 seconds, stage retries >= 0")
    device = device or default_device()
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    overrides = overrides or {}
    sections = {  # scenario file first, then the command line
        section: {**getattr(scenario_obj, section), **(overrides.get(section) or {})} for section in SECTIONS
    }
    sections["psg"]["spc"] = scenario_obj.spc
    resolved = with_overrides(get_profile(profile or scenario_obj.profile, device), **sections)
    resolved.psg.validate()
    out = Path(out) if out else Path("runs") / f"{scenario_obj.name}-eps{format_epsilon(scenario_obj.epsilon)}"
    assert set(scenario_obj.methods) <= set(METHODS) and scenario_obj.replay in REPLAY_MODES
    return RunSettings(
        scenario=scenario_obj,
        profile=resolved,
        epsilon=scenario_obj.epsilon,
        delta=scenario_obj.delta,
        methods=scenario_obj.methods,
        num_stages=stages or len(base.stages),
        seed=seed,
        device=device,
        out=out,
        replay=scenario_obj.replay,
        stage_timeout=stage_timeout,
        data_dir=data_dir,
        reconnect_timeout=reconnect_timeout,
        stage_retries=stage_retries,
    )
