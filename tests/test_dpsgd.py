"""DP-SGD finetuning: exact privacy spend, the released model, budget checks, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.accounting import RDP_ORDERS
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, dpsgd, get_method
from fedpsg.methods.dpsgd import DPSGDConfig, dpsgd_schedule
from fedpsg.nn.models import build_model

CONFIG = DPSGDConfig(epochs=1, batch_size=128)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def party_data(data_dir) -> ImageSet:
    """1000 random FashionMNIST training images of the first party's classes (5, 6)."""
    train = load_images("fmnist", train=True, data_dir=data_dir)
    part = train.only_classes([5, 6])
    keep = torch.randperm(len(part), generator=torch.Generator().manual_seed(0))[:1000]
    return ImageSet(part.images[keep], part.labels[keep])


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("convnet", 1, 10, (28, 28), width=8)


def finetune(model, data, *, epsilon, delta=1e-5, config=CONFIG, secret=None) -> Release:
    """DP-SGD on ``model`` through the base class's ``run`` (``secret=None``: fresh OS entropy)."""
    stage = PartyStage(data, [5, 6], dataset_spec("fmnist"), epsilon=epsilon, delta=delta, model=model)
    return get_method("dpsgd").run(stage, config, secret)


def trained(release: Release) -> torch.nn.Module:
    """The released weights in a fresh model of the same architecture (strict: same keys, same shapes)."""
    model = small_model(seed=1)
    model.load_state_dict(release.model_state)
    return model


class RecordingEngine(dpsgd.PrivacyEngine):
    """The PrivacyEngine dpsgd uses, remembered so that tests can read Opacus's own accountant."""

    instances: list[RecordingEngine] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingEngine.instances.append(self)


def test_spent_epsilon_is_the_target_and_agrees_with_opacus(party_data, monkeypatch):
    RecordingEngine.instances.clear()
    monkeypatch.setattr(dpsgd, "PrivacyEngine", RecordingEngine)
    epsilon, delta = 2.0, 1e-5
    record = finetune(small_model(), party_data, epsilon=epsilon, delta=delta).privacy

    assert record.epsilon == pytest.approx(epsilon, rel=1e-3)
    assert record.epsilon <= epsilon
    schedule = dpsgd_schedule(len(party_data), CONFIG)
    assert (record.steps, record.sample_rate) == (schedule.steps, schedule.sample_rate)
    assert record.noise_multiplier > 0 and record.max_grad_norm == CONFIG.max_grad_norm

    # Opacus's accountant saw every optimizer step, with the same sigma and sampling rate.
    (engine,) = RecordingEngine.instances
    assert engine.accountant.history == [(record.noise_multiplier, record.sample_rate, record.steps)]
    assert engine.accountant.get_epsilon(delta) == pytest.approx(record.epsilon, rel=1e-3)
    assert engine.accountant.get_epsilon(delta, alphas=list(RDP_ORDERS)) == pytest.approx(record.epsilon, rel=1e-9)
    fresh = RDPAccountant()
    fresh.history = [(record.noise_multiplier, record.sample_rate, record.steps)]
    assert fresh.get_epsilon(delta, alphas=list(RDP_ORDERS)) == pytest.approx(record.epsilon, rel=1e-9)


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 128), (930, 10), (12000, 256), (5, 256)])
def test_schedule_is_what_opacus_poisson_loader_yields(n, batch_size):
    # (930, 10): ceil(N/B) = 93 but int(1 / (1/93)) = 92, so the loader yields 92 batches.
    config = DPSGDConfig(epochs=3, batch_size=batch_size)
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size))
    schedule = dpsgd_schedule(n, config)
    assert schedule.sample_rate == loader.sample_rate
    assert schedule.steps_per_epoch == len(loader) == sum(1 for _ in loader)
    assert schedule.steps == 3 * len(loader)


def test_releases_a_plain_trained_state_and_leaves_the_given_model_as_it_was(party_data):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    release = finetune(model, party_data, epsilon=5.0)
    assert release.images is None and release.labels is None

    after = release.model_state
    assert list(after) == list(before)  # no "_module." prefix: a plain module's state
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    assert all(torch.isfinite(v).all() for v in after.values())
    assert trained(release).state_dict().keys() == before.keys()
    # The coordinator's model is finetuned as a copy: unchanged, and Opacus left nothing on it.
    assert type(model).__name__ == "ConvNet"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
    for p in model.parameters():
        assert p.grad is None
        assert not any(hasattr(p, a) for a in ("grad_sample", "_forward_counter", "summed_grad"))


def test_non_private_run(party_data):
    model = small_model()
    release = finetune(model, party_data, epsilon=math.inf)
    record = release.privacy
    assert math.isinf(record.epsilon) and record.noise_multiplier == 0.0
    assert record.steps == dpsgd_schedule(len(party_data), CONFIG).steps
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), trained(release).parameters()))


@pytest.mark.parametrize(("epsilon", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (math.nan, 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_rejects_bad_budget_before_training(party_data, epsilon, delta, monkeypatch):
    trainings, engines = [], []
    monkeypatch.setattr(dpsgd, "_train", lambda *args: trainings.append(args))
    monkeypatch.setattr(dpsgd, "PrivacyEngine", lambda *args, **kwargs: engines.append(kwargs))
    model = small_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError):
        finetune(model, party_data, epsilon=epsilon, delta=delta)
    assert trainings == [] and engines == []  # rejected before any step or any Opacus engine
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_only_the_secret_reproduces_a_run(party_data):
    runs = []
    for secret in (SecretRandomness.fixed(0), SecretRandomness.fixed(0), None, None):
        runs.append(finetune(small_model(), party_data, epsilon=2.0, secret=secret).model_state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # pinned secret (unit tests only)
    assert any(not torch.equal(runs[2][k], runs[3][k]) for k in runs[0])  # fresh OS entropy each run


def test_empty_poisson_batches_still_take_noisy_steps(party_data):
    # Three examples at sample rate 1/3: many batches are empty; the run must neither crash nor go NaN.
    tiny = ImageSet(party_data.images[:3], party_data.labels[:3])
    config = DPSGDConfig(epochs=10, batch_size=1)
    release = finetune(small_model(), tiny, epsilon=1.0, config=config)
    record = release.privacy
    assert record.steps == 30 and record.epsilon == pytest.approx(1.0, rel=1e-3)
    assert all(torch.isfinite(v).all() for v in release.model_state.values())
