"""Command-line pieces shared by ``fedpsg.simulate``, ``fedpsg.generate`` and ``fedpsg.deploy``.

Flags parse with the functions of ``fedpsg.runs.settings``, so a value means the same thing on every
command line, in ``flwr run --run-config`` and in the compose environment.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpsg.data.datasets import DATA_DIR_ENV, DatasetSpec, dataset_spec, validate_classes
from fedpsg.methods import PROFILES, Method, get_method, method_names
from fedpsg.nn.evaluation import EvalConfig
from fedpsg.runs.scenario import REPLAY_MODES, available_scenarios
from fedpsg.runs.settings import (
    DEFAULT_RECONNECT_TIMEOUT,
    DEFAULT_SCENARIO,
    DEFAULT_STAGE_RETRIES,
    DEFAULT_STAGE_TIMEOUT,
    RunSettings,
    format_epsilon,
    method_sections,
    method_settings,
    override_sections,
    parse_epsilons,
    parse_methods,
    resolve_device,
    resolve_profile,
    resolve_settings,
)


def _argument_type(parse: Callable, name: str) -> Callable:
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name
    return convert


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {text}")
    return value


def _open_unit_float(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError(f"must be in (0, 1), got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from err


epsilons = _argument_type(parse_epsilons, "epsilons")
positive_int = _argument_type(_positive_int, "positive_int")
open_unit_float = _argument_type(_open_unit_float, "open_unit_float")
int_list = _argument_type(_int_list, "int_list")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command shares: budget, profile, seed, data, device and ``--set``."""
    parser.add_argument("--eps", type=epsilons, default=None, help="epsilon per party ('inf' = non-private)")
    parser.add_argument("--delta", type=open_unit_float, default=None)
    parser.add_argument("--spc", type=positive_int, default=None, help="images per class (methods releasing a set)")
    parser.add_argument("--profile", choices=PROFILES, default=None, help="default: paper on CUDA, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="public seed (initialisations; never the DP noise)")
    parser.add_argument("--data-dir", default=None, help=f"dataset root (default: ${DATA_DIR_ENV}, then download)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting, e.g. psg.iterations=20 dpmerf.evaluation.epochs=20 evaluation.num_evals=1",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of a federated run (``simulate`` and ``deploy``)."""
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO, help=f"one of {available_scenarios()} or a YAML path")
    add_common_arguments(parser)
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(method_names())}")
    parser.add_argument("--replay", choices=REPLAY_MODES, default=None)
    parser.add_argument("--out", default=None, help="output folder (re-use it to resume)")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="independent repetitions (fresh party secrets, a public seed each) in <out>/repeat-<r>; "
        "<out> gets their means and 95%% confidence intervals",
    )
    parser.add_argument("--stages", type=positive_int, default=None, help="run only the first N stages")
    parser.add_argument(
        "--stage-timeout", type=float, default=DEFAULT_STAGE_TIMEOUT, help="seconds to wait for a party"
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=float,
        default=DEFAULT_RECONNECT_TIMEOUT,
        help="seconds to wait for a vanished party to return",
    )
    parser.add_argument(
        "--stage-retries", type=int, default=DEFAULT_STAGE_RETRIES, help="re-sends of a stage whose party vanished"
    )


def common_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the flags both scenario kinds read mean, as keyword arguments of either kind's
    ``resolve_*settings``."""
    return {
        "delta": args.delta,
        "methods": parse_methods(args.methods),
        "profile": args.profile,
        "seed": args.seed,
        "device": args.device,
        "data_dir": args.data_dir,
        "overrides": args.overrides,
    }


def settings_from_args(args: argparse.Namespace) -> list[RunSettings]:
    """One RunSettings per epsilon (a sweep ``--eps 1,10`` puts each run in ``<out>/eps<eps>``)."""
    sweep = args.eps or [None]
    runs = []
    for epsilon in sweep:
        out = args.out
        if len(sweep) > 1 and out:
            out = Path(out) / f"eps{format_epsilon(epsilon)}"
        runs.append(
            resolve_settings(
                args.scenario,
                epsilon=epsilon,
                spc=args.spc,
                out=out,
                stages=args.stages,
                replay=args.replay,
                stage_timeout=args.stage_timeout,
                reconnect_timeout=args.reconnect_timeout,
                stage_retries=args.stage_retries,
                **common_settings(args),
            )
        )
    return runs


def run_config_from_args(
    args: argparse.Namespace, *, out: Path, data_dir: str | None, epsilon: float | None = None
) -> dict[str, Any]:
    """The Flower run config the parsed flags mean (keys of ``fedpsg.runs.settings.RUN_CONFIG_KEYS``);
    ``epsilon``: one run of a sweep. Flags left at "the scenario's default" are left out."""
    scenario = Path(args.scenario)
    eps = [epsilon] if epsilon is not None else args.eps
    values = {
        # The ServerApp runs in the SuperLink's folder: a scenario file is named by its absolute path.
        "scenario": str(scenario.resolve()) if scenario.suffix in (".yaml", ".yml") else args.scenario,
        "eps": ",".join(format_epsilon(e) for e in eps) if eps else None,
        "delta": args.delta,
        "spc": args.spc,
        "methods": args.methods,
        "profile": args.profile,
        "replay": args.replay,
        "seed": args.seed,
        "stages": args.stages,
        "device": args.device,
        "stage-timeout": args.stage_timeout,
        "reconnect-timeout": args.reconnect_timeout,
        "stage-retries": args.stage_retries,
        "set": " ".join(args.overrides) or None,
        "repeats": args.repeats,
        "parallel-jobs": getattr(args, "parallel_jobs", None),
        "parties": getattr(args, "parties", None),
        "split": getattr(args, "split", None),
        "round-timeout": getattr(args, "round_timeout", None),
        "out": str(out),
        "data-dir": data_dir,
    }
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class PartySettings:
    """One party's method run (``generate``, ``audit``): every setting resolved and validated."""

    method: Method
    spec: DatasetSpec
    classes: list[int]
    config: Any  # the method's config dataclass
    evaluation: EvalConfig
    epsilon: float
    delta: float
    device: str
    profile: str


def party_settings(args: argparse.Namespace, command: str) -> PartySettings:
    """From ``--method --dataset --classes`` and the common flags; raise ValueError on anything invalid."""
    if args.eps and len(args.eps) > 1:
        raise ValueError(f"--eps: {command} takes one epsilon")
    method = get_method(args.method)
    spec = dataset_spec(args.dataset)
    classes = args.classes if args.classes is not None else list(range(spec.num_classes))
    validate_classes(classes, spec.num_classes)
    device = resolve_device(args.device)
    profile = resolve_profile(args.profile, None, device)
    sections = override_sections({}, args.overrides, method_sections([method.name]))
    config, evaluation = method_settings(method.name, profile, sections, args.spc)
    epsilon, delta = (args.eps or [10.0])[0], args.delta or 1e-5
    return PartySettings(method, spec, classes, config, evaluation, epsilon, delta, device, profile)
