"""A new method is one file plus one registration line.

This file *is* that file: it defines a toy DP method (noisy class means, a real Gaussian
mechanism) and registers it. Nothing else in the repository knows it, yet it runs a two-stage
scenario through the Flower-free loop and through the Flower simulation on Ray (which imports
it from ``FEDPSG_PLUGINS``, as users load their own methods).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from fedpsg.continual.coordinator import Coordinator
from fedpsg.continual.local import LocalParties
from fedpsg.dp.accounting import PrivacyRecord, private_record
from fedpsg.dp.mechanisms import gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PLUGINS_ENV, Method, PartyStage, Release, method_names, register_method
from fedpsg.nn.evaluation import SMALL_SET_EVALUATION
from fedpsg.runs.settings import resolve_settings
from tests.conftest import REPO


@dataclass(frozen=True)
class NoisyMeansConfig:
    spc: int = 3
    max_norm: float = 30.0  # per-image clipping bound (normalised pixels)
    jitter: float = 0.3  # public noise that makes the spc copies differ

    def __post_init__(self) -> None:
        if self.spc < 1 or self.max_norm <= 0 or self.jitter < 0:
            raise ValueError("need spc >= 1, max_norm > 0 and jitter >= 0")


@register_method  # the one registration line
class NoisyMeans(Method):
    """Each class's mean image, released once with the Gaussian mechanism (add/remove, public n)."""

    name = "toy"
    label = "noisy class means"
    releases = "synthetic"
    config_class = NoisyMeansConfig
    presets = {profile: NoisyMeansConfig() for profile in ("paper", "cpu", "tiny")}
    evaluation = SMALL_SET_EVALUATION

    def plan(self, stage: PartyStage, config: NoisyMeansConfig) -> PrivacyRecord:
        # Classes are disjoint, so one example changes one row by at most max_norm: one release.
        return private_record(stage.epsilon, stage.delta, 1.0, 1, dataset_size=len(stage.data))

    def run(self, stage: PartyStage, config: NoisyMeansConfig, secret: SecretRandomness | None = None) -> Release:
        secret = secret or SecretRandomness.fresh(stage.device)
        images = stage.data.images.flatten(1)
        images = images * (config.max_norm / images.norm(dim=1, keepdim=True)).clamp(max=1.0)
        sums = torch.stack([images[stage.data.labels == c].sum(0) for c in stage.classes])
        record = self.plan(stage, config)
        (noisy,) = gaussian_mechanism([sums], record.noise_multiplier * config.max_norm, secret.noise)
        means = noisy / (len(stage.data) / len(stage.classes))
        public = torch.Generator().manual_seed(stage.seed)
        copies = means.repeat_interleave(config.spc, 0)
        copies = copies + config.jitter * torch.randn(copies.shape, generator=public)
        labels = torch.tensor(stage.classes).repeat_interleave(config.spc)
        stage.progress(1).step()
        return Release(record, images=copies.view(-1, *stage.data.images.shape[1:]), labels=labels)




FAST = ["evaluation.epochs=20", "evaluation.num_evals=1", "toy.spc=2"]


def test_toy_method_runs_a_scenario_without_flower(tmp_path, data_dir, single_thread):
    assert "toy" in method_names()
    settings = resolve_settings(
        "split_mnist", profile="tiny", stages=2, methods=["toy"], out=tmp_path, data_dir=str(data_dir), overrides=FAST
    )
    parties = LocalParties(str(data_dir))
    rows = Coordinator(settings).run(parties)
    assert [r["stage"] for r in rows] == [1, 2] and all(r["method"] == "toy" for r in rows)
    assert all(r["epsilon"] == pytest.approx(10.0, rel=1e-3) for r in rows)
    assert len(parties.replies) == 2 and parties.replies[0].images.shape == (2 * 2, 1, 28, 28)
    assert rows[0]["accuracy"] > 0.9  # two digit classes from their noisy means
    assert (tmp_path / "DONE").exists() and (tmp_path / "grids" / "toy-stage2.png").exists()
    assert "| toy |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_toy_method_runs_through_the_flower_simulation(tmp_path, data_dir):
    env = {**os.environ, PLUGINS_ENV: "tests.test_plugin_method", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "fedpsg.simulate", "--scenario", "split_mnist", "--methods", "toy"]
    command += ["--profile", "tiny", "--stages", "2", "--out", str(tmp_path), "--data-dir", str(data_dir)]
    result = subprocess.run([*command, "--set", *FAST], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "results.csv")
    assert frame["method"].tolist() == ["toy", "toy"] and frame["stage"].tolist() == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["final_accuracy"]["toy"] > 0.5
    assert "[party 1] toy stage 2" in result.stdout + result.stderr  # progress from inside the Ray actor
