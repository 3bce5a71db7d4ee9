"""The canary audit: its statistics against their definitions, and its power against a leak."""

import json
import math

import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

from fedpsg.audit.canary import (
    binomial_tail,
    bound_from_scores,
    epsilon_lower_bound,
    guess,
    mislabeled_canaries,
    noise_removed,
    p_value,
)
from fedpsg.audit.cli import main as audit_main
from fedpsg.budget.ledger import Ledger
from fedpsg.data.datasets import ImageSet
from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness


def test_binomial_tail_is_the_definition():
    for trials, successes, p in [(3, 2, 0.5), (10, 7, 0.73), (25, 25, 0.9), (12, 0, 0.3), (8, 9, 0.5)]:
        exact = sum(math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(successes, trials + 1))
        assert binomial_tail(trials, successes, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_all_correct_guesses_bound_epsilon_as_the_theorem_says():
    # 100 of 100 right: P[all right | eps] = sigmoid(eps)^100 < alpha  <=>  eps < logit(alpha^(1/100)).
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert p_value(100, 100, math.log(q / (1 - q))) == pytest.approx(0.05, rel=1e-6)


def test_chance_level_guessing_proves_nothing():
    assert epsilon_lower_bound(100, 50, 0.05) == 0.0
    assert epsilon_lower_bound(100, 58, 0.05) == 0.0  # P[Bin(100, 1/2) >= 58] = 0.067 > 5%
    assert epsilon_lower_bound(100, 60, 0.05) > 0.0  # P[Bin(100, 1/2) >= 60] = 0.028 < 5%


def test_delta_makes_the_bound_more_conservative():
    assert epsilon_lower_bound(100, 95, 0.05, delta=1e-4, canaries=100) < epsilon_lower_bound(100, 95, 0.05)


def test_separating_scores_give_a_large_bound_and_random_ones_none():
    generator = torch.Generator().manual_seed(0)
    included = torch.rand(400, generator=generator) < 0.5
    perfect = bound_from_scores({"loss": included.float()}, included, delta=1e-5)
    assert perfect["epsilon_lower_bound"] > 3
    assert perfect["correct"] >= perfect["guesses"] - 2  # guessing all 400: in and out are not exactly 200 each
    random = bound_from_scores({"loss": torch.rand(400, generator=generator)}, included, delta=1e-5)
    assert random["epsilon_lower_bound"] < 0.5
    # Every try is reported and the confidence is split over all of them.
    assert len(random["tries"]) == 5


@pytest.mark.parametrize("m", [3, 7, 11])
def test_no_canary_is_guessed_both_in_and_out(m):
    # m = 3 mod 4 and fraction 1: round(m / 2) exceeds m // 2.
    included = torch.arange(m) % 2 == 0
    score = included.float() + torch.linspace(0, 0.5, m)  # separates in from out perfectly
    guessed_in, guessed_out = guess(score, 1.0)
    assert len(guessed_in) == len(guessed_out) == m // 2
    assert not set(guessed_in.tolist()) & set(guessed_out.tolist())
    rows = bound_from_scores({"loss": score}, included, delta=0.0)["tries"]
    assert rows[-1]["guesses"] == 2 * (m // 2)
    assert all(row["correct"] == row["guesses"] for row in rows)  # a canary guessed both ways is once wrong
    with pytest.raises(ValueError, match="at least 2 canaries"):
        bound_from_scores({"loss": score[:1]}, included[:1], delta=0.0)


def test_canaries_are_mislabelled_images_of_other_classes():
    generator = torch.Generator().manual_seed(1)
    pool = ImageSet(torch.randn(500, 1, 4, 4), torch.arange(500) % 10)
    canaries = mislabeled_canaries(pool, [5, 6], 200, generator)
    assert set(canaries.labels.tolist()) == {5, 6}
    assert not set(canaries.true_labels.tolist()) & {5, 6}
    assert 70 < int(canaries.included.sum()) < 130
    with pytest.raises(ValueError, match="only 400 images outside"):
        mislabeled_canaries(pool, [5, 6], 401, generator)


def test_noise_removed_turns_every_mechanism_off_and_back_on():
    value = torch.ones(1000)
    secret = SecretRandomness.fixed(0)
    with noise_removed():
        (released,) = gaussian_mechanism([value], 1.0, secret.noise, contribution=Contribution(1.0, 1.0))
        assert torch.equal(released, value)
        assert torch.equal(opacus_optimizer._generate_noise(1.0, value), torch.zeros_like(value))
    (released,) = gaussian_mechanism([value], 1.0, secret.noise, contribution=Contribution(1.0, 1.0))
    assert 0.9 < float((released - value).std()) < 1.1


def test_fresh_audit_writes_its_report(tmp_path, data_dir, single_thread, party_state):
    out = tmp_path / "audit"
    argv = ["--method", "dpmerf", "--dataset", "mnist", "--classes", "5,6", "--eps", "1", "--profile", "tiny",
            "--canaries", "40", "--real", "200", "--variants", "private,noise-removed",
            "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    assert audit_main(argv) == 0
    report = json.loads((out / "audit.json").read_text())
    assert [r["variant"] for r in report["runs"]] == ["private", "noise-removed"]
    for run in report["runs"]:
        assert run["claimed_epsilon"] <= 1.0 + 1e-6  # noise removed: the accountant still claims eps
        assert run["epsilon_lower_bound"] >= 0
    assert report["real_images"] == 200 and report["canaries"] == 40
    assert {m["stage"] for m in report["memorisation"]} == {"private", "noise-removed"}
    assert "Verdict" in (out / "audit.md").read_text()
    # Both runs read the party's data: both are in its lifetime ledger, the control as non-private.
    entries = Ledger(party_state / "local", "mnist").entries()
    assert [(e.purpose, e.private) for e in entries] == [
        ("audit of dpmerf (private)", True),
        ("audit of dpmerf (noise-removed)", False),
    ]
    assert entries[0].privacy.epsilon == pytest.approx(1.0, rel=1e-3) and entries[1].privacy.noise_multiplier == 0


@pytest.mark.slow
def test_dpsgd_audit_catches_the_leak_and_respects_the_claim(tmp_path, data_dir, single_thread):
    """Positive control: non-private DP-SGD memorises mislabelled canaries; the DP run stays below eps."""
    out = tmp_path / "audit"
    argv = ["--method", "dpsgd", "--dataset", "mnist", "--classes", "5,6", "--eps", "2", "--profile", "tiny",
            "--canaries", "200", "--real", "200", "--variants", "private,non-private",
            "--set", "dpsgd.epochs=60", "dpsgd.batch_size=32", "dpsgd.lr=0.1", "dpsgd.momentum=0.9",
            "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    assert audit_main(argv) == 0
    runs = {r["variant"]: r for r in json.loads((out / "audit.json").read_text())["runs"]}
    assert runs["non-private"]["epsilon_lower_bound"] > 1.0
    assert runs["private"]["epsilon_lower_bound"] <= runs["private"]["claimed_epsilon"]
