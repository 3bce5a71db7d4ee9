"""A party owns its budget: the coordinator plays the attacker through the real ClientApp.

Every attack is a request a coordinator can send (new run id, huge epsilon, large delta, eps = inf,
a non-private method, another split, many requests at once); each must be refused with the
party's ledger unchanged. The lifetime ledger composes a continual stage, federated-GAN rounds and
a ``generate`` run on the same data, checked against Google's dp_accounting.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from flwr.app import Message

import fedpsg.continual.party
import fedpsg.federated_gan.party
from fedpsg.budget.ledger import Ledger, composed_epsilon
from fedpsg.budget.policy import DataShare, PartyPolicy, Refused, load_policy, party_dir
from fedpsg.continual.protocol import TrainRequest, decode_reply, encode_train_request
from fedpsg.data.datasets import dataset_spec, load_images
from fedpsg.dp.accounting import private_record
from fedpsg.federated_gan.config import PRESETS
from fedpsg.federated_gan.party import BudgetSpent
from fedpsg.federated_gan.protocol import RoundRequest, encode_model_request, encode_sample_request
from fedpsg.ledger import main as ledger_main
from fedpsg.methods import PartyStage, get_method
from fedpsg.nn.evaluation import new_classifier
from fedpsg.runs.settings import resolve_settings
from fedpsg.simulation import party_policies, prepare_parties
from tests.conftest import REPO
from tests.inprocess import InProcessGrid, patch_task_identity

DPMERF = replace(get_method("dpmerf").presets["tiny"], generator_steps=10, samples_per_class=5)
EVAL = get_method("dpmerf").evaluation["tiny"]
GAN = replace(PRESETS["tiny"], rounds=2, batch_size=4)
SHARE = DataShare(5, "iid", 0)
# One run of at most eps 10 on MNIST: the party's whole lifetime budget.
ONE_RUN = PartyPolicy(epsilon=10.0, delta=1e-5, max_run_epsilon=10.0, dataset="mnist", classes=(5, 6), share=SHARE)


def stage_request(epsilon=10.0, delta=1e-5, method="dpmerf", classes=(5, 6), stage=1) -> TrainRequest:
    model = new_classifier(dataset_spec("mnist"), EVAL, seed=0).state_dict()
    config = asdict(DPMERF) if method == "dpmerf" else asdict(get_method(method).presets["tiny"])
    return TrainRequest(
        method, stage, 0, "mnist", 0, list(classes), epsilon, delta, 0, config, model, EVAL.architecture
    )


def round_request(run_id="run-a", round_index=0, epsilon=10.0, split="iid") -> RoundRequest:
    return RoundRequest(run_id, round_index, 0, "mnist", 5, split, 0, epsilon, 1e-5, GAN)


def gan_samples() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(4, 1, 28, 28, generator=generator), torch.tensor([5, 6, 5, 6])


@pytest.fixture
def grid(monkeypatch, data_dir, party_state):
    patch_task_identity(monkeypatch)
    return InProcessGrid(data_dir, num_partitions=1, torch_threads=1, policy=ONE_RUN, state_dir=party_state)


def send(grid: InProcessGrid, content, message_type: str = "train") -> Message:
    return grid.send_and_receive([Message(content, dst_node_id=1000, message_type=message_type)])[0]


def ledger_bytes(party_state: Path) -> bytes | None:
    path = party_dir(0, party_state) / "ledger-mnist.json"
    return path.read_bytes() if path.exists() else None


ATTACKS = {
    "huge epsilon": lambda: ("train", encode_train_request(stage_request(epsilon=1e6))),
    "eps inf": lambda: ("train", encode_train_request(stage_request(epsilon=math.inf))),
    "large delta": lambda: ("train", encode_train_request(stage_request(delta=0.1))),
    "another class split": lambda: ("train", encode_train_request(stage_request(classes=(0, 1)))),
    "a method the party does not allow": lambda: ("train", encode_train_request(stage_request(method="psg"))),
    "a non-private method": lambda: (
        "train.fedavg_gan",
        encode_model_request(round_request(), {}, {}),
    ),
    "another federated split": lambda: (
        "train.fed_gswgan",
        encode_sample_request(round_request(split="by-class"), *gan_samples()),
    ),
    "federated-GAN with a huge epsilon": lambda: (
        "train.fed_gswgan",
        encode_sample_request(round_request(epsilon=1e6), *gan_samples()),
    ),
    "a run id that is a path": lambda: (
        "train.fed_gswgan",
        encode_sample_request(round_request(run_id="../../elsewhere"), *gan_samples()),
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_coordinators_attack_is_refused_and_the_ledger_is_unchanged(attack, grid, party_state, monkeypatch):
    policy = replace(ONE_RUN, methods=("dpmerf", "fed-gswgan"))
    policy.write(party_dir(0, party_state) / "policy.yaml")
    message_type, content = ATTACKS[attack]()
    before = ledger_bytes(party_state)

    def no_private_data(*args, **kwargs):
        raise AssertionError("a refused request read the party's data")

    monkeypatch.setattr(fedpsg.continual.party, "load_split", no_private_data)
    monkeypatch.setattr(fedpsg.federated_gan.party, "_party_share", no_private_data)
    with pytest.raises(Refused, match="party 0 refuses"):
        send(grid, content, message_type)
    assert ledger_bytes(party_state) == before  # nothing written
    assert not (party_state / "elsewhere").exists()


def test_a_respelled_dataset_opens_no_fresh_ledger(grid, party_state):
    """MNIST, mnist, Mnist: the same data, so one ledger; the second eps-10 run does not fit."""
    policy = replace(ONE_RUN, dataset=None)
    policy.write(party_dir(0, party_state) / "policy.yaml")
    assert not send(grid, encode_train_request(stage_request())).has_error()
    for spelling in ("MNIST", "Mnist"):
        respelled = replace(stage_request(), dataset=spelling)
        with pytest.raises(Refused, match="lifetime budget on mnist"):
            send(grid, encode_train_request(respelled))
    ledgers = [p.name for p in party_dir(0, party_state).glob("ledger-*.json")]
    assert ledgers == ["ledger-mnist.json"]


def test_a_new_run_id_gets_no_fresh_budget(grid, party_state, data_dir):
    samples = gan_samples()
    for round_index in range(2):  # run a: its plan (2 rounds, eps 10 together) is the whole lifetime budget
        reply = send(grid, encode_sample_request(round_request("run-a", round_index), *samples), "train.fed_gswgan")
        assert not reply.has_error()
    before = ledger_bytes(party_state)
    with pytest.raises(BudgetSpent):  # the run's own plan is spent
        send(grid, encode_sample_request(round_request("run-a", 2), *samples), "train.fed_gswgan")
    with pytest.raises(Refused, match=r"lifetime budget on mnist is epsilon 10 .* left"):
        send(grid, encode_sample_request(round_request("run-b", 0), *samples), "train.fed_gswgan")
    assert ledger_bytes(party_state) == before
    assert not list((party_dir(0, party_state) / "runs" / "run-b").glob("*.pt"))  # no warm start on its data
    assert [e.purpose for e in Ledger(party_dir(0, party_state), "mnist").entries()] == [
        "fed-gswgan round 0 of run 'run-a'",
        "fed-gswgan round 1 of run 'run-a'",
    ]


def test_a_retried_round_with_other_samples_is_a_new_charged_release(grid, party_state):
    images, labels = gan_samples()
    first = send(grid, encode_sample_request(round_request(), images, labels), "train.fed_gswgan")
    again = send(grid, encode_sample_request(round_request(), images, labels), "train.fed_gswgan")
    assert torch.equal(first.content.array_records["gradients"].to_torch_state_dict()["gradients"],
                       again.content.array_records["gradients"].to_torch_state_dict()["gradients"])  # fmt: skip
    other = send(grid, encode_sample_request(round_request(), images.flip(-1), labels), "train.fed_gswgan")
    gradients = [m.content.array_records["gradients"].to_torch_state_dict()["gradients"] for m in (first, other)]
    assert not torch.equal(*gradients)  # computed for the new samples, not the cached ones
    assert len(Ledger(party_dir(0, party_state), "mnist").entries()) == 2
    assert dict(other.content.config_records["privacy"])["releases"] == 2


def test_concurrent_requests_cannot_spend_one_budget_twice(grid, party_state, monkeypatch):
    """Four requests at once for a budget of one release: exactly one is answered."""
    monkeypatch.setattr(Ledger, "_write", _slow_write(Ledger._write))
    outcomes: list[object] = []

    def ask() -> None:
        try:
            outcomes.append(send(grid, encode_train_request(stage_request())))
        except Refused as err:
            outcomes.append(err)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = [o for o in outcomes if isinstance(o, Message)]
    assert len(answered) == 1 and sum(isinstance(o, Refused) for o in outcomes) == 3
    assert decode_reply(answered[0].content).images is not None
    entries = Ledger(party_dir(0, party_state), "mnist").entries()
    assert len(entries) == 1 and entries[0].status == "released"


def _slow_write(write):
    """A slow disk: the window between reading the ledger and writing it is wide open for a race."""

    def slowly(self, entries):
        time.sleep(0.5)
        write(self, entries)

    return slowly


def _reserve_in_another_process(home: str, start, results) -> None:
    Ledger._write = _slow_write(Ledger._write)
    record = private_record(8.0, 1e-5, 1.0, 1)
    start.wait(timeout=120)  # a barrier: all three are ready before any of them reserves
    try:
        Ledger(Path(home), "mnist").reserve(record, ONE_RUN, method="dpmerf", purpose="race")
        results.put("reserved")
    except Refused:
        results.put("refused")


def test_processes_racing_for_the_last_release_spend_it_once(tmp_path):
    """Across processes (and restarts) the file lock and the ledger on disk decide, not memory."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_reserve_in_another_process, args=(str(tmp_path), start, results))
               for _ in range(3)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    outcomes = sorted(results.get(timeout=10) for _ in workers)
    assert outcomes == ["refused", "refused", "reserved"]  # two eps-8 releases compose to 12.2 > 10
    assert len(Ledger(tmp_path, "mnist").entries()) == 1


def _reserve_and_die(home: str) -> None:
    Ledger(Path(home), "mnist").reserve(private_record(8.0, 1e-5, 1.0, 1), ONE_RUN, method="dpmerf", purpose="crash")
    os._exit(1)  # killed while computing: the release is never marked, no reply leaves


def test_a_reservation_counts_while_its_process_lives_and_not_once_it_died_before_releasing(tmp_path):
    worker = multiprocessing.get_context("spawn").Process(target=_reserve_and_die, args=(str(tmp_path),))
    worker.start()
    worker.join(timeout=120)
    ledger = Ledger(tmp_path, "mnist")
    (crashed,) = ledger.entries()
    assert crashed.status == "abandoned" and ledger.spent(1e-5) == 0.0  # nothing left the party
    live = ledger.reserve(private_record(8.0, 1e-5, 1.0, 1), ONE_RUN, method="dpmerf", purpose="in flight")
    assert ledger.entries()[1].status == "reserved" and ledger.spent(1e-5) == pytest.approx(8.0, rel=1e-3)
    with pytest.raises(Refused):  # the one in flight is counted: a second eps-8 release does not fit in 10
        ledger.reserve(private_record(8.0, 1e-5, 1.0, 1), ONE_RUN, method="dpmerf", purpose="too much")
    ledger.mark_released(live)
    assert [e.status for e in ledger.entries()] == ["abandoned", "released"]


def test_a_release_that_fails_is_marked_and_still_counted(tmp_path):
    """An error reply leaves the party instead of the release: what was computed stays charged."""
    ledger = Ledger(tmp_path, "mnist")
    with (
        pytest.raises(RuntimeError),
        ledger.release(private_record(4.0, 1e-5, 1.0, 1), ONE_RUN, method="dpmerf", purpose="stage 1"),
    ):
        raise RuntimeError("the method crashed")
    assert [e.status for e in ledger.entries()] == ["failed"]
    assert ledger.spent(1e-5) == pytest.approx(4.0, rel=1e-3)


def test_the_lifetime_ledger_composes_a_continual_stage_federated_rounds_and_a_generate_run(
    grid, party_state, data_dir
):
    home = party_dir(0, party_state)
    policy = PartyPolicy(epsilon=14.0, delta=1e-5, max_run_epsilon=10.0, dataset="mnist", share=SHARE)
    policy.write(home / "policy.yaml")
    assert not send(grid, encode_train_request(stage_request(epsilon=4.0))).has_error()  # continual, DP-Merf
    for round_index in range(2):  # federated GAN: 2 rounds of an eps-8 plan
        request = replace(round_request(round_index=round_index), epsilon=8.0)
        assert not send(grid, encode_sample_request(request, *gan_samples()), "train.fed_gswgan").has_error()
    generate = [
        sys.executable, "-m", "fedpsg.generate", "--method", "psg", "--dataset", "mnist", "--classes", "5,6",
        "--eps", "5", "--profile", "tiny", "--set", "psg.iterations=1", "--no-eval",
        "--data-dir", str(data_dir), "--out", str(party_state / "generated"), "--party-dir", str(home),
    ]  # fmt: skip
    result = subprocess.run(generate, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]

    entries = Ledger(home, "mnist").entries()
    assert [e.method for e in entries] == ["dpmerf", "fed-gswgan", "fed-gswgan", "psg"]
    assert all(e.status == "released" for e in entries)
    # The same mixed sequence through an independent accountant.
    accountant = rdp.RdpAccountant(orders=[1 + x / 20 for x in range(1, 200)] + list(range(11, 512)))
    for entry in entries:
        p = entry.privacy
        event = dp_event.GaussianDpEvent(p.noise_multiplier)
        if p.sample_rate < 1:
            event = dp_event.PoissonSampledDpEvent(p.sample_rate, event)
        accountant.compose(event, count=p.steps)
    expected = accountant.get_epsilon(1e-5)
    spent = Ledger(home, "mnist").spent(1e-5)
    assert spent == pytest.approx(expected, rel=0.01)

    # What is left decides: a request that would cross the lifetime budget is refused.
    left = policy.epsilon - spent
    with pytest.raises(Refused, match=f"{left:.4g} is left"):
        send(grid, encode_train_request(stage_request(epsilon=10.0)))


def test_the_ledger_command_shows_and_resets_only_when_asked(party_state, capsys):
    home = party_dir(0, party_state)
    ONE_RUN.write(home / "policy.yaml")
    Ledger(home, "mnist").reserve(private_record(4.0, 1e-5, 1.0, 1), ONE_RUN, method="dpmerf", purpose="stage 1")
    assert ledger_main([str(home)]) == 0
    shown = capsys.readouterr().out
    assert "stage 1: dpmerf" in shown and "budget: epsilon 10" in shown and "left: 6.0" in shown
    with pytest.raises(SystemExit):
        ledger_main([str(home), "--reset"])  # which ledger: must be said
    assert len(Ledger(home, "mnist").entries()) == 1
    assert ledger_main([str(home), "--reset", "--dataset", "mnist"]) == 0
    assert Ledger(home, "mnist").entries() == []


def test_a_policy_is_read_from_the_party_side_only_in_its_order(tmp_path, monkeypatch, grid):
    node, folder, env = tmp_path / "node.yaml", tmp_path / "party", tmp_path / "env.yaml"
    for path, epsilon in ((node, 1), (folder / "policy.yaml", 2), (env, 3)):
        PartyPolicy(epsilon=epsilon).write(path)
    monkeypatch.setenv("FEDPSG_PARTY_POLICY", str(env))
    assert load_policy(str(node), folder).epsilon == 1  # node config first
    assert load_policy(None, folder).epsilon == 2  # then the party's folder
    assert load_policy(None, tmp_path / "no-such-party").epsilon == 3  # then the environment
    monkeypatch.delenv("FEDPSG_PARTY_POLICY")
    assert load_policy(None, tmp_path / "no-such-party") == PartyPolicy()  # the default
    assert PartyPolicy().trust_coordinator is False  # private requests only
    monkeypatch.setenv("FEDPSG_PARTY_POLICY", str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(None, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown policy keys"):
        PartyPolicy.from_dict({"epsilon": 3, "budget": 4})
    with pytest.raises(ValueError, match="true or false"):
        PartyPolicy.from_dict({"trust_coordinator": "false"})  # a quoted "false" must not read as yes
    with pytest.raises(ValueError, match="finite"):
        PartyPolicy(epsilon=math.inf)
    # A request carries no policy of its own: extra settings in it are rejected, not obeyed.
    request = encode_train_request(stage_request())
    request.config_records["config"]["hp.trust_coordinator"] = True
    with pytest.raises(ValueError, match="unknown DPMerfConfig settings"):
        send(grid, request)


@pytest.mark.parametrize(
    "scenario, profile, epsilon",
    [
        ("split_mnist", "cpu", 10.0),
        ("split_fmnist", "cpu", 1.0),
        pytest.param("split_fmnist", "paper", 10.0, marks=pytest.mark.slow),
    ],
)
def test_the_default_comparison_fits_the_simulated_and_the_demo_policies(scenario, profile, epsilon, data_dir):
    """Every party's plans for the scenario's four methods, on its real data, composed by the ledger."""
    settings = resolve_settings(scenario, epsilon=epsilon, profile=profile, data_dir=str(data_dir))
    demo = load_policy(str(REPO / "policies" / "demo.yaml"))
    train = load_images(settings.scenario.dataset, train=True, data_dir=str(data_dir))
    spec = dataset_spec(settings.scenario.dataset)
    for policy, classes in zip(party_policies(settings), settings.scenario.stages):
        stage = PartyStage(train.only_classes(classes), classes, spec, epsilon, settings.delta, 0, torch.nn.Identity())
        plans = [get_method(m).plan(stage, settings.configs[m]) for m in settings.methods]
        assert len(plans) == 4 and all(p.epsilon <= epsilon for p in plans)
        assert composed_epsilon(plans, policy.delta) <= policy.epsilon  # the simulation's parties
        assert composed_epsilon(plans, demo.delta) <= demo.epsilon  # docker compose / deploy
        assert composed_epsilon(plans, policy.delta) > epsilon  # the plans are real: more than one run


@pytest.mark.slow
def test_the_flower_simulation_reports_a_refusal_and_keeps_what_was_released(tmp_path, data_dir):
    """Through Flower on Ray: party 1 allows at most eps 1 per run, the coordinator asks for 10."""
    out = tmp_path / "run"
    PartyPolicy(epsilon=1.0, delta=1e-5, dataset="mnist").write(party_dir(1, out / "parties") / "policy.yaml")
    command = [
        sys.executable, "-m", "fedpsg.simulate", "--scenario", "split_mnist", "--methods", "dpmerf",
        "--profile", "tiny", "--stages", "2", "--eps", "10", "--out", str(out), "--data-dir", str(data_dir),
        "--set", "dpmerf.generator_steps=10", "evaluation.epochs=5", "evaluation.num_evals=1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    refusal = "party 1 refuses dpmerf stage 2 (method dpmerf, epsilon 10, delta 1e-05): one run may cost at most"
    assert refusal in result.stderr  # the coordinator's error names the party, what was asked and the limit
    assert refusal in (out / "run.log").read_text()
    assert (out / "sets" / "dpmerf" / "stage1.pt").exists()  # stage 1's release is kept
    assert not (out / "DONE").exists()
    parties = out / "parties"
    assert len(Ledger(party_dir(0, parties), "mnist").entries()) == 1
    assert not (party_dir(1, parties) / "ledger-mnist.json").exists()  # refused before anything was written
    assert "max_run_epsilon: 10" in (party_dir(0, parties) / "policy.yaml").read_text()  # written by the launcher


def test_a_resumed_simulation_with_more_methods_keeps_every_methods_budget_and_the_users_policy(tmp_path):
    first = resolve_settings("split_mnist", methods=["psg"], profile="tiny", out=tmp_path)
    state = prepare_parties(first)
    assert load_policy(None, party_dir(0, state)).methods == ("psg",)
    strict = PartyPolicy(epsilon=1.0, methods=("psg",))
    strict.write(party_dir(1, state) / "policy.yaml")  # the user's own: kept as it is
    state = prepare_parties(resolve_settings("split_mnist", methods=["dpsgd", "dpmerf"], profile="tiny", out=tmp_path))
    grown = load_policy(None, party_dir(0, state))
    assert set(grown.methods) == {"psg", "dpsgd", "dpmerf"} and grown.epsilon == 30.0 and grown.classes == (5, 6)
    assert load_policy(None, party_dir(1, state)) == strict
    with pytest.raises(ValueError, match="--trust-coordinator"):
        prepare_parties(resolve_settings("split_mnist", epsilon=math.inf, profile="tiny", out=tmp_path))
