"""Fed-GS-WGAN: the party's sanitisation and ledger, the messages, the split and a Flower run."""

import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedpsg.methods.gswgan as gswgan
from clients.app import app as client_app
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import DataShare, PartyPolicy
from fedpsg.dp.secret import SecretRandomness
from fedpsg.federated_gan.config import PRESETS, participations_per_party, round_parties
from fedpsg.federated_gan.party import BudgetSpent, answer_samples, load_party_data
from fedpsg.federated_gan.protocol import (
    GRADIENT_REPLY_KEYS,
    RoundRequest,
    decode_gradient_reply,
    encode_gradient_reply,
    encode_sample_request,
)
from fedpsg.federated_gan.split import party_classes, party_indices

TINY = replace(PRESETS["tiny"], rounds=3, batch_size=6)
# The party's own policy: its share of 5 (iid, seed 0), runs of at most eps 10, room for several runs.
POLICY = PartyPolicy(epsilon=100.0, delta=1e-4, max_run_epsilon=10.0, dataset="mnist", share=DataShare(5, "iid", 0))


def party(tmp_path, policy=POLICY) -> dict:
    """The keyword arguments that place a party in its folder under ``tmp_path`` with ``policy``."""
    return {"party_folder": tmp_path / "party-1", "policy": policy}


def request(round_index=0, partition=1, epsilon=10.0, config=TINY, run_id="test", num_parties=5, split="iid"):
    return RoundRequest(run_id, round_index, partition, "mnist", num_parties, split, 0, epsilon, 1e-5, config)


def samples(count=6, classes=(0, 1, 2), seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.randint(len(classes), (count,), generator=generator)]
    return torch.rand(count, 1, 28, 28, generator=generator), labels


@pytest.fixture
def releases(monkeypatch):
    """Every Gaussian release the party makes: (values before noise, noise std)."""
    made = []
    real = gswgan.gaussian_mechanism

    def recording(values, std, generator, **kwargs):
        made.append(([v.clone() for v in values], std))
        return real(values, std, generator, **kwargs)

    monkeypatch.setattr(gswgan, "gaussian_mechanism", recording)
    return made


def test_each_sample_gradient_is_clipped_to_c_before_the_noise_and_the_noise_matches_the_plan(
    tmp_path, data_dir, releases, single_thread
):
    config = replace(TINY, max_grad_norm=0.01)  # well below the critic's typical gradient norm: clipping bites
    images, labels = samples()
    reply = answer_samples(request(config=config), images, labels, data_dir=str(data_dir), **party(tmp_path))
    (values,), std = releases[0]
    norms = values.flatten(1).norm(dim=1)
    assert len(releases) == 1 and values.shape == images.shape
    assert (norms <= 0.01 * (1 + 1e-5)).all() and (norms > 0.01 * 0.99).any()
    # s = sigma * 2 C sqrt(B): any change of the party's dataset moves each of the B rows within its C-ball
    assert std == pytest.approx(reply.privacy.noise_multiplier * 2 * 0.01 * math.sqrt(len(labels)))
    noise = reply.gradients - values
    assert noise.std().item() == pytest.approx(std, rel=0.1)  # the reply is the clipped rows plus that noise


def test_the_plan_composes_the_most_rounds_a_party_is_asked_and_the_ledger_stops_there(
    tmp_path, data_dir, releases, single_thread
):
    config = replace(TINY, rounds=7, parties_per_round=2)
    # Cyclic selection: 7 rounds x 2 of 5 parties -> nobody is asked more than ceil(14 / 5) = 3 times.
    counts = [0] * 5
    for r in range(7):
        for p in round_parties(r, 2, 5):
            counts[p] += 1
    assert max(counts) == participations_per_party(7, 2, 5) == 3 and sum(counts) == 14

    images, labels = samples()
    replies = [
        answer_samples(request(r, config=config), images, labels, data_dir=str(data_dir), **party(tmp_path))
        for r in range(3)
    ]
    plan = replies[-1].privacy
    assert plan.steps == 3 and plan.sample_rate == 1.0 and plan.adjacency == "user-level"
    assert [r.releases for r in replies] == [1, 2, 3] and len(releases) == 3  # one release per answered round
    # The same round asked again (a restarted coordinator) gets the same release, at no cost.
    again = answer_samples(request(2, config=config), images, labels, data_dir=str(data_dir), **party(tmp_path))
    assert torch.equal(again.gradients, replies[-1].gradients) and len(releases) == 3
    with pytest.raises(BudgetSpent):
        answer_samples(request(3, config=config), images, labels, data_dir=str(data_dir), **party(tmp_path))
    assert len(releases) == 3

    # An independent accountant (Google's dp_accounting): 3 Gaussian releases at sigma, sample rate 1.
    accountant = rdp.RdpAccountant(orders=[1 + x / 10 for x in range(1, 100)] + list(range(12, 256)))
    accountant.compose(dp_event.GaussianDpEvent(plan.noise_multiplier), count=3)
    assert accountant.get_epsilon(1e-5) == pytest.approx(10.0, rel=0.02)
    assert plan.epsilon <= 10.0


def _answer_and_die_before_the_mark(tmp_path: str, data_dir: str) -> None:
    """A party process killed after computing a round's reply and before its ledger marked it released."""
    torch.set_num_threads(1)
    Ledger.mark_released = lambda self, entry: os._exit(1)
    answer_samples(request(), *samples(), data_dir=data_dir, **party(Path(tmp_path)))


def test_a_reply_the_ledger_never_counted_is_not_served_again_for_free(tmp_path, data_dir, releases, single_thread):
    worker = multiprocessing.get_context("spawn").Process(
        target=_answer_and_die_before_the_mark, args=(str(tmp_path), str(data_dir))
    )
    worker.start()
    worker.join(timeout=300)
    ledger = Ledger(tmp_path / "party-1", "mnist")
    assert worker.exitcode == 1 and [e.status for e in ledger.entries()] == ["abandoned"]  # died before the mark
    # The coordinator re-sends the round with the same samples: whatever the party sends now is charged.
    again = answer_samples(request(), *samples(), data_dir=str(data_dir), **party(tmp_path))
    assert again.releases == 1 and len(releases) == 1  # computed afresh in this process, with new noise
    assert sorted(e.status for e in ledger.entries()) == ["abandoned", "released"]


def test_the_noise_is_the_partys_secret(tmp_path, data_dir, single_thread):
    images, labels = samples()
    one = answer_samples(request(run_id="a"), images, labels, data_dir=str(data_dir), **party(tmp_path))
    two = answer_samples(request(run_id="b"), images, labels, data_dir=str(data_dir), **party(tmp_path))
    assert not torch.allclose(one.gradients, two.gradients)  # same public inputs, fresh OS entropy
    fixed = [
        answer_samples(
            request(run_id=f"fixed{i}"), images, labels, data_dir=str(data_dir), **party(tmp_path),
            secret=SecretRandomness.fixed(5),
        ).gradients
        for i in range(2)
    ]  # fmt: skip
    assert torch.allclose(fixed[0], fixed[1])  # everything else is deterministic: the secret is what differs


@pytest.fixture
def party_context(monkeypatch, data_dir, tmp_path):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    node_config = {"partition-id": 1, "num-partitions": 5, "data-dir": str(data_dir), "state-dir": str(tmp_path)}
    POLICY.write(tmp_path / "party-1" / "policy.yaml")  # the party's own policy, in its folder
    return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})


def test_a_partys_reply_holds_only_the_noisy_sample_gradients_and_its_privacy_record(party_context, tmp_path):
    images, labels = samples()
    content = encode_sample_request(request(), images, labels)
    reply = client_app(Message(content, dst_node_id=42, message_type="train.fed_gswgan"), party_context)
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == GRADIENT_REPLY_KEYS
    arrays = reply.content.array_records["gradients"].to_torch_state_dict()
    assert list(arrays) == ["gradients"] and arrays["gradients"].shape == images.shape  # nothing of the critic
    assert not reply.content.metric_records
    privacy = dict(reply.content.config_records["privacy"])
    assert privacy["epsilon"] <= 10.0 and privacy["releases"] == 1 and privacy["adjacency"] == "user-level"
    assert (tmp_path / "party-1" / "runs" / "test" / "fed-gswgan-critic.pt").exists()  # the critic stayed home

    extra = encode_gradient_reply(decode_gradient_reply(reply.content))
    extra["critic"] = reply.content.array_records["gradients"]
    with pytest.raises(ValueError, match="may only carry"):
        decode_gradient_reply(extra)  # the coordinator refuses anything beyond the two records

    wrong = encode_sample_request(request(partition=3), images, labels)
    with pytest.raises(ValueError, match="partition 3 reached the party holding 1"):
        client_app(Message(wrong, dst_node_id=42, message_type="train.fed_gswgan"), party_context)


@pytest.mark.parametrize("num_parties, split", [(5, "iid"), (5, "by-class"), (50, "iid"), (50, "by-class")])
def test_the_split_gives_every_example_to_exactly_one_party(num_parties, split):
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    shares = party_indices(labels, num_parties, split, seed=3)
    everything = torch.cat(shares)
    assert len(everything) == 1000 and len(everything.unique()) == 1000
    classes = party_classes(num_parties, 10, split)
    for share, held in zip(shares, classes):
        assert set(labels[share].unique().tolist()) == set(held)
        assert len(share) == pytest.approx(1000 / num_parties, abs=10)
    if split == "by-class" and num_parties == 5:
        assert classes == [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]


def test_a_party_is_asked_only_about_classes_it_holds(data_dir):
    by_class = replace(POLICY, share=DataShare(5, "by-class", 0))
    data = load_party_data(request(partition=2, split="by-class"), by_class, str(data_dir))
    assert set(data.labels.unique().tolist()) == {2, 7}
    with pytest.raises(ValueError, match="does not hold"):
        data.batch_like(torch.tensor([2, 3]), torch.Generator())


def run_simulation(out, data_dir, *extra) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "fedpsg.simulate", "--scenario", "fed_gswgan_mnist", "--profile", "tiny",
        "--eps", "10", "--out", str(out), "--data-dir", str(data_dir), *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def running_in(out) -> list[str]:
    """Command lines of live processes that name ``out`` (the simulation SuperLink names its database there)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(out) in text and "pytest" not in text:
            found.append(text)
    return found


@pytest.mark.slow
def test_a_flower_simulation_writes_its_outputs_and_resumes_after_interruption(tmp_path, data_dir):
    out, rounds = tmp_path / "run", 6
    extra = ["--methods", "fed-gswgan,fedavg-gan", "--set", f"gan.rounds={rounds}", "gan.eval_every=3"]
    extra += ["--trust-coordinator"]  # fedavg-gan sends non-private parameters
    first = run_simulation(out, data_dir, *extra)
    checkpoint = out / "checkpoints" / "fed-gswgan.pt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:  # interrupt once two rounds are on disk
        if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["state"].next_round >= 2:
            os.killpg(first.pid, signal.SIGTERM)  # `kill`, or Ctrl-C: the runtime stops with the command
            break
        time.sleep(0.1)
    first.wait(timeout=60)
    assert not running_in(out)  # the simulation SuperLink and its runtime are gone too
    assert not (out / "DONE").exists()
    done_before = torch.load(checkpoint, weights_only=False)["state"].next_round
    assert 2 <= done_before < rounds

    second = run_simulation(out, data_dir, *extra)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output[-4000:]
    assert f"fed-gswgan: resuming after round {done_before} of {rounds}" in (out / "run.log").read_text()
    for name in ["results.csv", "rounds.csv", "privacy.json", "summary.json", "accuracy.png", "report.md", "DONE"]:
        assert (out / name).exists(), name
    results = pd.read_csv(out / "results.csv")
    for method in ("fed-gswgan", "fedavg-gan"):
        assert results[results["method"] == method]["round"].tolist() == [3, 6], method
        assert (out / "grids" / f"{method}-round6.png").stat().st_size > 0
    rounds_table = pd.read_csv(out / "rounds.csv")
    gswgan_rounds = rounds_table[rounds_table["method"] == "fed-gswgan"]
    assert gswgan_rounds["round"].tolist() == list(range(1, rounds + 1))  # no round lost or doubled
    # The interruption may cut a round short after some parties answered it: each of them spent that
    # release, so after the round is redone their plan (one release per round) runs out one round
    # early and they refuse the last round, as a party must. Every other round hears all five.
    answered = gswgan_rounds["parties_answered"].tolist()
    assert answered[:-1] == [5] * (rounds - 1) and 1 <= answered[-1] <= 5
    log = (out / "run.log").read_text()
    left_out = re.findall(rf"fed-gswgan round {rounds}: partition \d+ left out", log)
    assert len(left_out) == 5 - answered[-1]
    if left_out:
        assert "the run's plan is spent" in log
    # What goes up is B samples' gradients, not parameters: far fewer bytes than FedAvg's models.
    per_round = json.loads((out / "summary.json").read_text())["bytes_per_round_per_party"]
    samples_bytes = 8 * 28 * 28 * 4  # tiny preset: B = 8 float32 images
    assert samples_bytes <= per_round["fed-gswgan"]["up"] < 1.1 * samples_bytes
    assert per_round["fedavg-gan"]["up"] > 5 * per_round["fed-gswgan"]["up"]
    # Every party stayed within its plan, whatever the interruption: releases <= planned steps, eps <= 10.
    privacy = json.loads((out / "privacy.json").read_text())["fed-gswgan"]
    assert sorted(privacy) == ["0", "1", "2", "3", "4"]
    for record in privacy.values():
        assert record["releases"] <= record["steps"] == rounds and record["epsilon"] <= 10.0
    assert len(list((out / "parties").glob("party-*/runs/*/fed-gswgan-critic.pt"))) == 5  # critics stayed home
    # As many counted releases as the plan has rounds: a re-sent round is served from a counted reply or charged
    # again (then the party refuses the last round), never sent uncounted.
    for partition in range(5):
        entries = Ledger(out / "parties" / f"party-{partition}", "mnist").entries()
        assert sum(e.method == "fed-gswgan" and e.status == "released" for e in entries) == rounds
        assert {e.status for e in entries} <= {"released", "abandoned"}  # abandoned: killed mid-round


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--parties", "0"], "must be >= 1"),
        (["--split", "diagonal"], "invalid choice"),
        (["--methods", "psg"], "subset of"),
        (["--set", "gan.rounds=0"], "must be >= 1: rounds"),
        (["--set", "psg.iterations=3"], "unknown settings section 'psg'"),
        (["--spc", "10"], "--spc is for continual scenarios"),
        (["--eps", "1,10"], "one --eps"),
    ],
)
def test_bad_federated_flags_are_rejected_before_anything_starts(flags, reason, tmp_path, capsys):
    from fedpsg.simulate import main

    with pytest.raises(SystemExit) as stopped:
        main(["--scenario", "fed_gswgan_mnist", "--out", str(tmp_path / "run"), *flags])
    assert stopped.value.code == 2 and reason in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_federated_scenario_is_not_read_as_a_continual_one():
    from fedpsg.runs.scenario import load_scenario, scenario_kind

    assert scenario_kind("fed_gswgan_fmnist") == "federated-gan" and scenario_kind("split_mnist") == "continual"
    with pytest.raises(ValueError, match="is a federated-gan scenario"):
        load_scenario("fed_gswgan_mnist")


def test_a_run_folder_with_other_settings_is_not_resumed(tmp_path):
    from fedpsg.data.datasets import ImageSet
    from fedpsg.federated_gan.coordinator import FedGANRun
    from fedpsg.runs.folder import ResumeMismatchError
    from fedpsg.simulate import build_parser, federated_settings_from_args

    test_images = ImageSet(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))

    def settings(*flags):
        args = ["--scenario", "fed_gswgan_mnist", "--profile", "tiny", "--out", str(tmp_path), *flags]
        return federated_settings_from_args(build_parser().parse_args(args))

    FedGANRun(settings("--eps", "10"), test_images)
    FedGANRun(settings("--eps", "10", "--methods", "fed-gswgan"), test_images)  # fewer methods: same run
    assert settings("--eps", "10").run_id() == settings("--eps", "10", "--methods", "fedavg-gan").run_id()
    with pytest.raises(ResumeMismatchError, match="scenario"):
        FedGANRun(settings("--eps", "1"), test_images)
    with pytest.raises(ResumeMismatchError, match="gan"):
        FedGANRun(settings("--eps", "10", "--set", "gan.rounds=3"), test_images)
