"""The randomness a party's DP guarantee rests on is the party's secret, and the accountant counts
every release that is actually made.

Threat: the coordinator receives every release and knows everything in the request (public seed,
hyperparameters, model), the run folder and the logs. If it could replay a party's sampling and
noise, it would re-run the method on D and on D' (one record removed) and decide membership with
certainty, whatever epsilon the accountant printed.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import asdict, replace

import pytest
import torch
from flwr.app import Message

from fedpsg.continual.coordinator import Coordinator
from fedpsg.continual.protocol import TrainRequest, decode_reply, encode_train_request
from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp import gradients as dp_gradient
from fedpsg.dp import mechanisms, secret
from fedpsg.dp.accounting import PrivacyRecord
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, dpmerf, get_method, psg
from fedpsg.methods.dpsgd import DPSGDConfig
from fedpsg.nn.evaluation import new_classifier
from fedpsg.nn.models import build_model
from fedpsg.runs.settings import resolve_settings
from server.app import GridParties
from tests.inprocess import InProcessGrid, patch_task_identity

PSG = replace(get_method("psg").presets["tiny"], iterations=1, outer_loop=2, batch_loop=2, inner_loop=2)
DPSGD = replace(get_method("dpsgd").presets["tiny"], epochs=1)
DPMERF = replace(get_method("dpmerf").presets["tiny"], generator_steps=20, samples_per_class=10)
TINY_EVAL = get_method("psg").evaluation["tiny"]
DPDM = replace(get_method("dpdm").presets["tiny"], iterations=10)
GSWGAN = replace(get_method("gswgan").presets["tiny"], generator_iterations=6, samples_per_class=10)
DPAC = replace(get_method("dpac").presets["tiny"], generator_iterations=6, samples_per_class=10)
# DP-MEPF's release is DP-Merf's code path (tests/test_dpmepf.py checks its one release and its secret).
CONFIGS = {"psg": PSG, "dpsgd": DPSGD, "dpmerf": DPMERF, "dpdm": DPDM, "gswgan": GSWGAN, "dpac": DPAC}
CLASSES = [1, 2]  # partition 1 of the default order
ARCH = TINY_EVAL.architecture


@pytest.fixture
def grid(monkeypatch, data_dir):
    patch_task_identity(monkeypatch)
    return InProcessGrid(data_dir)


@pytest.fixture(scope="module")
def party_data(data_dir) -> ImageSet:
    return load_images("fmnist", train=True, data_dir=data_dir).only_classes(CLASSES)


def request_for(method: str, seed: int = 7) -> TrainRequest:
    model_state = new_classifier(dataset_spec("fmnist"), TINY_EVAL, seed=3).state_dict()
    return TrainRequest(
        method, 2, 1, "fmnist", 0, CLASSES, 10.0, 1e-5, seed, asdict(CONFIGS[method]), model_state, ARCH
    )


def run_locally(method: str, data: ImageSet, config, *, epsilon=10.0, seed=0, model=None, secret=None) -> Release:
    """The method on the party's data, as the party runs it (``secret=None``: fresh OS entropy)."""
    stage = PartyStage(data, CLASSES, dataset_spec("fmnist"), epsilon=epsilon, delta=1e-5, seed=seed, model=model)
    return get_method(method).run(stage, config, secret)


def flattened(release: Release) -> torch.Tensor:
    """The DP set, or (DP-SGD) the DP-trained model's state, flattened."""
    if release.images is not None:
        return release.images
    return torch.cat([v.flatten().float() for v in release.model_state.values()])


def released(grid: InProcessGrid, request: TrainRequest) -> torch.Tensor:
    """What the party sends back: the DP set, or (DP-SGD) the DP-trained model, flattened."""
    node = next(n for n, c in grid.contexts.items() if c.node_config["partition-id"] == request.partition)
    message = grid.send_and_receive([Message(encode_train_request(request), dst_node_id=node, message_type="train")])[0]
    assert not message.has_error(), message.error
    return flattened(decode_reply(message.content))


def replay_with_everything_the_coordinator_holds(method: str, request: TrainRequest, data: ImageSet) -> torch.Tensor:
    """The attack that used to work: re-run the method with the request's seed driving all randomness."""
    guessed = SecretRandomness.fixed(request.seed)  # the old code seeded sampling/noise with seed, seed + 1
    spec = dataset_spec(request.dataset)
    model = build_model(ARCH["model"], spec.channels, spec.num_classes, spec.image_size, ARCH["width"], ARCH["depth"])
    model.load_state_dict(request.model_state)
    config = CONFIGS[method]
    return flattened(run_locally(method, data, config, epsilon=10.0, seed=request.seed, model=model, secret=guessed))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_the_coordinator_cannot_replay_a_release_and_identical_requests_release_different_outputs(
    method, grid, party_data
):
    request = request_for(method)
    first, second = released(grid, request), released(grid, request)
    assert first.shape == second.shape
    assert not torch.allclose(first, second)  # (b) identical inputs, different releases
    replayed = replay_with_everything_the_coordinator_holds(method, request, party_data)
    assert not torch.allclose(replayed, first)  # (a) request + seeds + config do not reproduce it


def test_nothing_derived_from_the_secret_leaves_the_party(monkeypatch, grid, data_dir, tmp_path, caplog, capfd):
    """(c) Run a whole two-stage, three-method scenario with known secret seeds and look for them
    (decimal, hex, raw 8 bytes) in every reply, every file of the run folder and the logs."""
    issued: list[int] = []

    def known_entropy() -> int:
        issued.append(0x5EC2E7A1B3C5D7E9 + 7919 * len(issued))  # distinctive in every byte
        return issued[-1]

    monkeypatch.setattr(secret, "_os_entropy_seed", known_entropy)
    settings = resolve_settings(
        "split_fmnist",
        profile="tiny",
        stages=2,
        methods=["psg", "dpsgd", "dpmerf"],
        out=tmp_path / "run",
        data_dir=str(data_dir),
        overrides=[
            "psg.iterations=1", "psg.outer_loop=2", "psg.batch_loop=2", "psg.inner_loop=2",
            "evaluation.epochs=5", "evaluation.num_evals=1", "dpmerf.evaluation.epochs=2",
            "dpmerf.generator_steps=20", "dpmerf.samples_per_class=10",
        ],
    )  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        Coordinator(settings).run(GridParties(grid))
    assert len(issued) >= 2 * 3 * 2  # two secret streams per release, 2 stages x 3 methods

    def leaks(blob: bytes) -> list[int]:
        text = blob.decode("latin-1").lower()
        found = []
        for value in issued:
            patterns = [struct.pack("<q", value), struct.pack(">q", value)]
            if str(value) in text or f"{value:x}" in text or any(p in blob for p in patterns):
                found.append(value)
        return found

    for reply in grid.replies:  # the serialised records the coordinator receives
        for record in reply.content.array_records.values():
            for array in record.values():
                assert not leaks(array.data)
        for record in reply.content.config_records.values():
            assert not leaks(json.dumps(dict(record), default=str).encode())
    files = [p for p in settings.out.rglob("*") if p.is_file()]
    assert {"config.json", "summary.json", "run.log", "results.csv"} <= {p.name for p in files}
    for path in files:
        assert not leaks(path.read_bytes()), path
    out, err = capfd.readouterr()
    assert not leaks((caplog.text + out + err).encode())


# ---------------------------------------------------------------------------------------------
# The accountant composes exactly the releases that are made, at the rate they are sampled
# ---------------------------------------------------------------------------------------------


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call's arguments are recorded."""
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def assert_poisson_sizes(sizes: list[int], n: int, sample_rate: float) -> None:
    """Batch sizes of Poisson sampling at rate q over n examples: Binomial(n, q) each."""
    mean, var = n * sample_rate, n * sample_rate * (1 - sample_rate)
    draws = torch.tensor(sizes, dtype=torch.float64)
    standard_error = math.sqrt(var / len(sizes))
    assert abs(draws.mean().item() - mean) < 5 * standard_error, (draws.mean().item(), mean)
    assert draws.var().item() == pytest.approx(var, rel=0.5)  # not a fixed batch size


def test_psg_makes_exactly_the_releases_it_accounts_for(monkeypatch, party_data, single_thread):
    config = replace(PSG, width=8, iterations=2, outer_loop=3, batch_loop=40, inner_loop=1, batch_size=64)
    releases = count_calls(monkeypatch, dp_gradient, "gaussian_mechanism")
    batches = count_calls(monkeypatch, psg, "private_gradient")
    record = run_locally("psg", party_data, config).privacy
    assert len(releases) == config.iterations * config.outer_loop * config.batch_loop == record.steps
    # Each release adds noise of std sigma * C, the sigma the accountant composed.
    assert all(args[1] == pytest.approx(record.noise_multiplier * config.max_grad_norm) for args, _ in releases)
    assert record.dataset_size == len(party_data)
    sizes = [len(args[2]) for args, _ in batches]  # the labels of each real batch
    assert_poisson_sizes(sizes, len(party_data), record.sample_rate)
    assert record.sample_rate == pytest.approx(config.batch_size / len(party_data))


def test_dpsgd_takes_exactly_the_noisy_steps_it_accounts_for(monkeypatch, party_data, single_thread):
    data = ImageSet(party_data.images[:2000], party_data.labels[:2000])
    config = DPSGDConfig(epochs=4, batch_size=20)
    # Opacus's optimizer adds its noise through the Gaussian mechanism: one release per step.
    noise_calls = count_calls(monkeypatch, mechanisms, "gaussian_mechanism")
    model = build_model("convnet", 1, 10, (28, 28), width=8, depth=2)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _module, args: sizes.append(len(args[0])))
    # DP-SGD trains a deep copy of the model, which carries this hook along.
    record = run_locally("dpsgd", data, config, epsilon=2.0, model=model).privacy
    assert len(noise_calls) == len(sizes) == record.steps == 4 * 100
    # Each of noise std sigma * C over every parameter, declared at the accounted rate and bound C.
    params = [p for p in model.parameters() if p.requires_grad]
    for args, kwargs in noise_calls:
        assert [v.shape for v in args[0]] == [p.shape for p in params]
        assert args[1] == pytest.approx(record.noise_multiplier * config.max_grad_norm)
        contribution = kwargs["contribution"]
        assert (contribution.bound, contribution.sample_rate) == (config.max_grad_norm, record.sample_rate)
    assert record.dataset_size == 2000
    assert_poisson_sizes(sizes, 2000, record.sample_rate)
    assert record.sample_rate == pytest.approx(20 / 2000)


def test_dpmerf_makes_one_release_at_the_add_remove_calibration(monkeypatch, party_data):
    releases = count_calls(monkeypatch, dpmerf, "gaussian_mechanism")
    record = run_locally("dpmerf", party_data, DPMERF, epsilon=1.0).privacy
    assert len(releases) == 1 == record.steps and record.sample_rate == 1.0
    (args, _) = releases[0]
    # Add/remove-one on a noisy sum over the public n: one unit-norm term, so std = sigma / n.
    assert args[1] == pytest.approx(record.noise_multiplier / len(party_data))
    assert record.adjacency == "add-remove" and record.dataset_size == len(party_data)


def test_privacy_record_round_trips_with_adjacency_and_size():
    record = PrivacyRecord(1.0, 1e-5, 0.8, 10, 0.01, "rdp", 0.1, "subsampled-gaussian", "add-remove", 12000)
    assert PrivacyRecord.from_dict(record.to_dict()) == record


def test_every_release_uses_the_secure_noise_draw(monkeypatch):
    # Opacus's secure_mode noise: four N(0, std^2) draws summed and halved (std preserved), which
    # defeats the floating-point attacks on single draws. Checked by its variance.
    from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism

    ONE = Contribution(bound=1.0, sample_rate=1.0)

    (noisy,) = gaussian_mechanism([torch.zeros(200_000)], 3.0, torch.Generator().manual_seed(0), contribution=ONE)
    assert noisy.std().item() == pytest.approx(3.0, rel=0.01)
    torch_normal = count_calls(monkeypatch, torch, "normal")
    gaussian_mechanism([torch.zeros(10)], 3.0, torch.Generator().manual_seed(0), contribution=ONE)
    assert len(torch_normal) == 5  # one discarded draw, then four


def test_public_seed_is_reproducible_and_leaves_the_global_stream_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    with secret.public_seed(7):
        first = torch.randn(3)
    after = torch.rand(4)
    with secret.public_seed(7):
        again = torch.randn(3)
    assert torch.equal(first, again)
    # Draws outside the block continue as if the block never ran: a public seed used for an
    # initialisation must not fix whatever the global RNG feeds next.
    assert torch.equal(after, expected_next)
