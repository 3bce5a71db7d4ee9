"""The white-box canary audit: the tap against the Gaussian mechanism's definition, the bounds,
and every method's noise going missing caught in one small run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedpsg.audit.whitebox import (
    CANARY_NORM,
    CanaryTap,
    canaries_for,
    gaussian_bound,
    gdp_delta,
    gdp_epsilon,
    gdp_mu,
    run_white_box,
)
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import STATE_DIR_ENV, PartyPolicy
from fedpsg.data.datasets import dataset_spec, load_images
from fedpsg.dp.mechanisms import Contribution, clip_jointly, gaussian_mechanism, tapped
from fedpsg.methods import PartyStage, get_method
from fedpsg.nn.evaluation import new_classifier


def test_gaussian_dp_conversion_matches_its_closed_form():
    # Dong, Roth & Su: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
    # mu = 1, eps = 1: Phi(-0.5) - e Phi(-1.5) = 0.308538 - 2.718282 * 0.0668072.
    assert gdp_delta(1.0, 1.0) == pytest.approx(0.308538 - 2.718282 * 0.0668072, abs=1e-5)
    # eps = 0: the total variation distance of N(0,1) and N(mu,1), 2 Phi(mu/2) - 1.
    assert gdp_delta(1.0, 0.0) == pytest.approx(0.382925, abs=1e-5)
    assert gdp_delta(1.0, gdp_epsilon(1.0, 1e-5)) == pytest.approx(1e-5, rel=1e-4)
    assert gdp_epsilon(gdp_mu(1.0, 1e-5), 1e-5) == pytest.approx(1.0, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_mu(1.0, 1e-5) < gdp_mu(4.0, 1e-5) < gdp_mu(10.0, 1e-5)


def test_the_gaussian_bound_recovers_a_known_separation_and_stays_below_it():
    generator = torch.Generator().manual_seed(0)
    included = torch.rand(20_000, generator=generator) < 0.5
    scores = torch.randn(20_000, generator=generator) * 3.0 + 3.0 * 0.5 * included  # mu = 0.5
    bound = gaussian_bound(scores, included, delta=1e-5)
    assert bound["mu"] == pytest.approx(0.5, abs=0.04)
    assert 0.4 < bound["mu_lower"] < bound["mu"]
    assert bound["epsilon_lower_bound"] < gdp_epsilon(0.5, 1e-5) < bound["epsilon_lower_bound"] + 0.6
    nothing = gaussian_bound(torch.randn(2000, generator=generator), included[:2000], delta=1e-5)
    assert nothing["epsilon_lower_bound"] < 0.3  # no separation: (almost) nothing claimed
    # More canaries are needed for a smaller margin above the target; none for a separation below it.
    assert canaries_for(0.5, 0.3) < canaries_for(0.5, 0.4)
    assert canaries_for(0.3, 0.5) is None


def releases_through_tap(fault: str, *, steps=400, std=2.0, rate=0.25, m=400, seed=0) -> CanaryTap:
    """``steps`` releases of zeros (1000 values) through a tapped Gaussian mechanism: bound 1, clipped jointly."""
    generator = torch.Generator().manual_seed(seed)
    included = torch.arange(m) % 2 == 0
    tap = CanaryTap(included, torch.zeros(m, dtype=torch.long), generator, fault)
    contribution = Contribution(1.0, rate, clip=lambda rows: clip_jointly(rows, 1.0))
    noise = torch.Generator().manual_seed(seed + 1)
    with tapped(tap):
        for _ in range(steps):
            gaussian_mechanism([torch.zeros(10, 100)], std, noise, contribution=contribution)
    return tap


@pytest.mark.parametrize(
    ("fault", "signal", "std"),
    [
        ("none", 1.0, 2.0),  # a canary is clipped from 4 to the bound 1, sampled at the rate
        ("clipping-removed", CANARY_NORM, 2.0),
        ("double-sampling", 2.0, 2.0),
        ("noise-halved", 1.0, 1.0),
    ],
)
def test_canaries_enter_as_the_mechanism_defines_them(fault, signal, std):
    # Scores of included canaries: sum over releases of (signal if sampled) + N(0, std^2): mean
    # steps * rate * signal; excluded: mean 0. Spread: sqrt(steps) * std (plus the sampling's).
    steps, rate = 400, 0.25
    tap = releases_through_tap(fault, steps=steps, rate=rate)
    inside, outside = tap.scores[tap.included], tap.scores[~tap.included]
    assert tap.releases == steps and (tap.observed == steps).all()
    expected_in = steps * rate * signal
    spread = math.sqrt(steps) * std
    assert float(inside.mean()) == pytest.approx(expected_in, abs=4 * spread / math.sqrt(len(inside)) + 1.0)
    assert abs(float(outside.mean())) < 4 * spread / math.sqrt(len(outside))
    assert float(outside.std()) == pytest.approx(spread, rel=0.15)


def test_noise_removed_separates_the_canaries_perfectly():
    tap = releases_through_tap("noise-removed", steps=50)
    assert (tap.scores[~tap.included] == 0).all() and (tap.scores[tap.included] > 0).all()


def test_a_grouped_release_carries_only_its_groups_canaries():
    generator = torch.Generator().manual_seed(0)
    included = torch.ones(8, dtype=torch.bool)
    groups = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7])
    tap = CanaryTap(included, groups, generator, "noise-removed")
    with tapped(tap):
        (out,) = gaussian_mechanism(
            [torch.zeros(50)], 1.0, generator, contribution=Contribution(1.0, 1.0, clip=None, group=3)
        )
    assert out.sum() == 4.0  # four canaries of group 3 at the bound (bounded by construction)
    assert tap.observed.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def tiny_stage(data_dir, method: str, epsilon: float) -> tuple:
    spec = dataset_spec("mnist")
    train = load_images("mnist", train=True, data_dir=str(data_dir)).only_classes([0, 1])
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:400]
    data = type(train)(train.images[keep], train.labels[keep])
    chosen = get_method(method)
    evaluation = chosen.evaluation["tiny"]
    stage = PartyStage(
        data=data, classes=[0, 1], spec=spec, epsilon=epsilon, delta=1e-5, seed=0,
        model=new_classifier(spec, evaluation, 0), progress_interval=1e9,
    )  # fmt: skip
    return chosen, chosen.presets["tiny"], stage


# dpmepf passes too (its release is DP-Merf's code path; 134 s, left out of CI for time).
@pytest.mark.parametrize("method", ["psg", "dpsgd", "dpdm", "dpmerf", "gswgan", "dpac"])
def test_a_method_whose_noise_goes_missing_is_caught(tmp_path, data_dir, method):
    chosen, config, stage = tiny_stage(data_dir, method, epsilon=1.0)
    ledger, policy = Ledger(tmp_path, "mnist"), PartyPolicy()
    broken = run_white_box(chosen, config, stage, 64, ledger, policy, fault="noise-removed")
    assert broken.verdict().startswith("VIOLATION"), broken.verdict()
    assert broken.claimed_epsilon == pytest.approx(1.0, rel=1e-3)  # the accountant still claims it
    # Without noise a canary's score counts the releases that sampled it, each adding exactly one
    # bound (the declared sensitivity: a canary too small or too large for it is not a whole
    # number), at the accounted rate; an excluded canary's is 0.
    inside, outside = broken.scores[broken.included], broken.scores[~broken.included]
    assert torch.allclose(inside, inside.round(), atol=1e-3) and outside.abs().max() < 1e-3
    rate, chances = float(inside.sum()), int(broken.observed[broken.included].sum())
    q = broken.release.privacy.sample_rate
    assert abs(rate - q * chances) < 5 * math.sqrt(chances * q * (1 - q)) + 1e-3
    correct = run_white_box(chosen, config, stage, 64, ledger, policy, fault="none")
    assert correct.verdict().startswith("consistent"), correct.verdict()
    assert len(ledger.entries()) == 2  # both read the data: both are in the party's ledger


def test_the_command_line_audits_white_box_and_says_so(tmp_path, data_dir, monkeypatch, capsys):
    from fedpsg.audit.cli import main as audit_main

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))  # the audit party's own folder
    out = tmp_path / "audit"
    command = ["--method", "dpmerf", "--white-box", "--eps", "1", "--profile", "tiny", "--canaries", "200"]
    command += ["--faults", "none,noise-removed", "--real", "300", "--data-dir", str(data_dir), "--out", str(out)]
    assert audit_main(command) == 0  # the correct mechanism is consistent: exit status 0
    report = json.loads((out / "audit.json").read_text())
    assert [run["fault"] for run in report["runs"]] == ["none", "noise-removed"]
    assert report["runs"][1]["verdict"].startswith("VIOLATION")
    assert "| noise-removed |" in (out / "audit.md").read_text()
    with pytest.raises(SystemExit):
        audit_main(["--method", "dpmerf", "--white-box", "--faults", "noise-gone", "--data-dir", str(data_dir)])
    assert "unknown faults" in capsys.readouterr().err
