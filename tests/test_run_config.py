"""`python -m fedpsg.simulate` runs on Flower's simulation runtime (`flwr run`): its flags become a run
config, which the ServerApp reads back into the very settings the flags mean."""

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fedpsg.federated_gan.config import federated_settings_from_run_config
from fedpsg.runs.cli import run_config_from_args, settings_from_args
from fedpsg.runs.settings import RunConfig, as_bool, settings_from_run_config
from fedpsg.runs.superlink import REPO, run_config_string
from fedpsg.simulate import build_parser, federated_settings_from_args


def flower_run_config(values: dict) -> dict:
    """What the ServerApp's ``context.run_config`` holds: pyproject's defaults fused with the
    ``--run-config`` string, parsed by Flower's own functions."""
    return get_fused_config_from_dir(REPO, parse_config_args([run_config_string(values)]))


CONTINUAL_FLAGS = [
    [],
    ["--eps", "1,10"],  # a sweep: one run config per epsilon
    [
        "--scenario", "split_mnist", "--eps", "2.5", "--delta", "1e-6", "--spc", "5", "--profile", "tiny",
        "--methods", "psg,dpmerf", "--replay", "continue", "--seed", "7", "--stages", "3", "--device", "cpu",
        "--stage-timeout", "120", "--reconnect-timeout", "30", "--stage-retries", "0",
        "--set", "psg.iterations=3", "evaluation.epochs=5",
    ],
]  # fmt: skip


@pytest.mark.parametrize("flags", CONTINUAL_FLAGS)
def test_a_continual_runs_flags_and_its_run_config_mean_the_same_settings(flags, tmp_path):
    args = build_parser().parse_args([*flags, "--out", str(tmp_path / "run")])
    runs = settings_from_args(args)
    for settings in runs:
        values = run_config_from_args(args, out=settings.out, data_dir="/data", epsilon=settings.epsilon)
        read = settings_from_run_config(flower_run_config(values))
        assert read == type(settings)(**{**settings.__dict__, "data_dir": "/data"})
    assert len(runs) == (2 if "1,10" in flags else 1)


def test_a_federated_runs_flags_and_its_run_config_mean_the_same_settings(tmp_path):
    flags = ["--scenario", "fed_gswgan_mnist", "--eps", "3", "--parties", "7", "--split", "iid", "--profile", "tiny"]
    flags += ["--round-timeout", "30", "--seed", "4", "--set", "gan.rounds=4", "--out", str(tmp_path / "run")]
    args = build_parser().parse_args(flags)
    settings = federated_settings_from_args(args)
    values = run_config_from_args(args, out=settings.out, data_dir=None, epsilon=settings.epsilon)
    read = federated_settings_from_run_config(flower_run_config(values))
    assert read == settings and read.num_partitions == 7 and read.round_timeout == 30.0


def test_bad_run_configs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="for federated-gan scenarios only"):
        settings_from_run_config(flower_run_config({"parties": 7}))
    with pytest.raises(ValueError, match="unknown run-config keys"):
        RunConfig({"epochs": 3})
    with pytest.raises(ValueError, match="one eps"):
        settings_from_run_config(flower_run_config({"eps": "1,10"}))
    assert as_bool(True) and as_bool("yes") and not as_bool("false")
    with pytest.raises(ValueError, match="true or false"):
        as_bool("maybe")
    assert flower_run_config({"repeats-together": True})["repeats-together"] is True
