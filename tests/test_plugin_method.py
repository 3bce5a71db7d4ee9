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
import threading
from dataclasses import dataclass, replace

import pandas as pd
import pytest
import torch

from fedpsg.continual.coordinator import Coordinator
from fedpsg.continual.local import LocalParties
from fedpsg.data.datasets import ImageSet, dataset_spec
from fedpsg.dp.accounting import PrivacyRecord, private_record
from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness
from fedpsg.io.progress import Progress
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

    def steps(self, stage: PartyStage, config: NoisyMeansConfig) -> int:
        return 1

    def release(
        self,
        stage: PartyStage,
        config: NoisyMeansConfig,
        plan: PrivacyRecord,
        secret: SecretRandomness,
        progress: Progress,
    ) -> Release:
        images = stage.data.images.flatten(1)
        images = images * (config.max_norm / images.norm(dim=1, keepdim=True)).clamp(max=1.0)
        sums = torch.stack([images[stage.data.labels == c].sum(0) for c in stage.classes])
        # Each example is in every release, in its class's row, clipped to max_norm (as above).
        contribution = Contribution.clipped_jointly(config.max_norm, sample_rate=1.0)
        (noisy,) = gaussian_mechanism(
            [sums], plan.noise_multiplier * config.max_norm, secret.noise, contribution=contribution
        )
        means = noisy / (len(stage.data) / len(stage.classes))
        public = torch.Generator().manual_seed(stage.seed)
        copies = means.repeat_interleave(config.spc, 0)
        copies = copies + config.jitter * torch.randn(copies.shape, generator=public)
        labels = torch.tensor(stage.classes).repeat_interleave(config.spc)
        progress.step()
        return Release(plan, images=copies.view(-1, *stage.data.images.shape[1:]), labels=labels)


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
    # real2gen: classifiers trained on the evaluator's real validation images label the noisy means
    assert (
        all(0.5 < r["real2gen"] <= 1 for r in rows) and "real2gen, last stage" in (tmp_path / "report.md").read_text()
    )
    assert (tmp_path / "DONE").exists() and (tmp_path / "grids" / "toy-stage2.png").exists()
    assert "| toy |" in (tmp_path / "report.md").read_text()


def test_an_evaluation_that_fails_ends_the_run_with_its_error_and_keeps_the_replies(
    tmp_path, data_dir, single_thread, monkeypatch
):
    settings = resolve_settings(
        "split_mnist", profile="tiny", stages=2, methods=["toy"], out=tmp_path, data_dir=str(data_dir), overrides=FAST
    )

    def broken(self, method, stage, party_seconds, privacy):
        raise RuntimeError(f"evaluation of {method} stage {stage} broke")

    monkeypatch.setattr(Coordinator, "evaluate_stage", broken)
    outcome = []
    run = threading.Thread(
        target=lambda: outcome.append(catch(Coordinator(settings).run, LocalParties(str(data_dir)))), daemon=True
    )
    run.start()
    run.join(timeout=300)
    assert not run.is_alive(), "a failed evaluation was started again and again"
    assert "evaluation of toy stage 1 broke" in str(outcome[0])
    assert (tmp_path / "sets" / "toy" / "stage2.pt").exists()  # what the parties released is kept
    assert not (tmp_path / "DONE").exists()


def catch(function, *args):
    try:
        return function(*args)
    except Exception as err:
        return err


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
    output = result.stdout + result.stderr
    assert "[party 1] toy stage 2" in output  # progress from inside the Ray actor
    assert f"thread(s) at nice {os.nice(0)}" in output  # Ray's workers at the driver's priority, not at 15
    # Flower's supported runtime (a simulation SuperLink and `flwr run`), not the deprecated run_simulation.
    assert "Starting Flower Simulation" in output and "`run_simulation` function is deprecated" not in output
    assert (tmp_path / "flower" / "superlink.log").exists()


# ---- what the base class's run() lets out -------------------------------------------------------


def tiny_stage(epsilon: float = 10.0) -> PartyStage:
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randn(8, 1, 28, 28, generator=generator), torch.tensor([5, 6]).repeat_interleave(4))
    return PartyStage(data, [5, 6], dataset_spec("mnist"), epsilon=epsilon, delta=1e-5)


class Misreporting(NoisyMeans):
    """The toy method, but its release claims a mechanism other than the one its plan wrote to the ledger."""

    def __init__(self, change) -> None:
        self.change = change

    def release(self, stage, config, plan, secret, progress) -> Release:
        honest = super().release(stage, config, plan, secret, progress)
        return replace(honest, privacy=self.change(honest.privacy))


class Imageless(NoisyMeans):
    """The toy method (declared 'synthetic'), but its release carries a model instead of the images."""

    def release(self, stage, config, plan, secret, progress) -> Release:
        honest = super().release(stage, config, plan, secret, progress)
        return Release(honest.privacy, model_state={"weight": honest.images.mean(0)})


class Modelless(NoisyMeans):
    """The toy method declared as releasing a model, but returning only images."""

    releases = "model"


def test_run_releases_what_plan_spends_and_a_missing_secret_is_fresh_entropy():
    stage, config = tiny_stage(), NoisyMeansConfig()
    first, second = NoisyMeans().run(stage, config), NoisyMeans().run(stage, config)
    assert first.images.shape == (6, 1, 28, 28) and first.labels.tolist() == [5, 5, 5, 6, 6, 6]
    assert first.privacy.steps == 1 and first.privacy.sample_rate == 1.0 and first.privacy.noise_multiplier > 0
    assert not torch.allclose(first.images, second.images)  # no secret given: fresh noise each time
    pinned = [NoisyMeans().run(stage, config, SecretRandomness.fixed(4)).images for _ in range(2)]
    assert torch.equal(*pinned)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: replace(r, noise_multiplier=r.noise_multiplier / 2),  # less noise than the ledger holds
        lambda r: replace(r, sample_rate=r.sample_rate / 2),
        lambda r: replace(r, steps=r.steps + 1),
        lambda r: replace(r, adjacency="replace-one"),
    ],
    ids=["noise", "sample-rate", "steps", "adjacency"],
)
def test_run_withholds_a_release_that_spends_other_than_planned(change):
    stage, config = tiny_stage(), NoisyMeansConfig()
    assert change(NoisyMeans().plan(stage, config)) != NoisyMeans().plan(stage, config)
    with pytest.raises(RuntimeError, match="withheld"):
        Misreporting(change).run(stage, config)
    Misreporting(lambda r: r).run(stage, config)  # the same method, honest, is let out


@pytest.mark.parametrize(
    ("method", "message"),
    [(Imageless(), "declares a synthetic release but returned no images"), (Modelless(), "returned no model")],
    ids=["synthetic-without-images", "model-without-model"],
)
def test_run_withholds_a_release_of_the_wrong_kind(method, message):
    with pytest.raises(RuntimeError, match=message):
        method.run(tiny_stage(), NoisyMeansConfig())


def test_run_releases_at_the_plan_it_is_given_and_checks_against_it():
    """The party's ledger holds the plan it wrote: run() uses that record, not a new calibration."""
    stage, config = tiny_stage(), NoisyMeansConfig()
    written = replace(NoisyMeans().plan(stage, config), noise_multiplier=3.0)
    secret = SecretRandomness.fixed(4)
    release = NoisyMeans().run(stage, config, SecretRandomness.fixed(4), planned=written)
    assert release.privacy == written
    calibrated = NoisyMeans().run(stage, config, secret)
    assert not torch.allclose(release.images, calibrated.images)  # same draws, the written noise scale
    with pytest.raises(RuntimeError, match="withheld"):
        Misreporting(lambda r: replace(r, steps=2)).run(stage, config, planned=written)


def test_the_plug_in_is_auditable_white_box_without_audit_code_of_its_own(tmp_path, data_dir):
    # Its one Gaussian release declares how an example enters it: the audit needs nothing more.
    from fedpsg.audit.whitebox import run_white_box
    from fedpsg.budget.ledger import Ledger
    from fedpsg.budget.policy import PartyPolicy
    from fedpsg.data.datasets import load_images

    train = load_images("mnist", train=True, data_dir=str(data_dir)).only_classes([5, 6])
    stage = PartyStage(train, [5, 6], dataset_spec("mnist"), epsilon=1.0, delta=1e-5)
    ledger, policy = Ledger(tmp_path, "mnist"), PartyPolicy()
    broken = run_white_box(NoisyMeans(), NoisyMeansConfig(), stage, 200, ledger, policy, fault="noise-removed")
    assert broken.verdict().startswith("VIOLATION")
    correct = run_white_box(NoisyMeans(), NoisyMeansConfig(), stage, 200, ledger, policy)
    assert correct.verdict().startswith("consistent")
