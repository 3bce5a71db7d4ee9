"""DP distribution matching (fedpsg.dpdm): clipping, releases vs accounting, secrets, utility."""

import math
from dataclasses import replace

import pytest
import torch

from fedpsg.data.augment import (
    DSA_OPERATIONS,
    AugmentationSampler,
    SiameseAugmentation,
    dsa_operations,
    sample_augmentation,
)
from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.accounting import private_record
from fedpsg.dp.mechanisms import poisson_sample
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, dpdm, get_method
from fedpsg.methods.dpdm import DPDM_PRESETS, DPDMConfig, clip_embeddings, embed
from fedpsg.nn.evaluation import EvalConfig, evaluate_training_set
from fedpsg.nn.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST = dataset_spec("mnist")
CLASSES = [5, 6]
TINY = DPDM_PRESETS["tiny"]
SMALL = replace(TINY, iterations=3)


@pytest.fixture(scope="module")
def mnist_56(data_dir):
    train = load_images("mnist", True, data_dir).only_classes(CLASSES)
    test = load_images("mnist", False, data_dir).only_classes(CLASSES)
    return train, test


def run(train, config=SMALL, epsilon=10.0, seed=0, secret=None, classes=CLASSES) -> Release:
    """dpdm through the base class's ``run`` (``secret=None``: fresh OS entropy)."""
    stage = PartyStage(train, classes, MNIST, epsilon=epsilon, delta=1e-5, seed=seed)
    return get_method("dpdm").run(stage, config, secret)


class Spy:
    """Records every call of a function of fedpsg.dpdm and forwards it."""

    def __init__(self, monkeypatch, name):
        self.calls, self.results = [], []
        original = getattr(dpdm, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.append((args, kwargs))
            self.results.append(result)
            return result

        monkeypatch.setattr(dpdm, name, wrapper)


# ---- clipping ---------------------------------------------------------------------------------


def test_clip_embeddings_against_a_brute_force_reference():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 0.5, 0.99, 1.0, 1.5, 10.0, 1e4]).repeat_interleave(3)
    embeddings = torch.randn(len(scales), 40, generator=generator, dtype=torch.float64)
    embeddings = embeddings / embeddings.norm(dim=1, keepdim=True) * scales[:, None].double()
    max_norm = 1.0
    clipped = clip_embeddings(embeddings, max_norm)
    reference = torch.zeros(40, dtype=torch.float64)
    for row in embeddings:
        norm = math.sqrt(sum(float(v) ** 2 for v in row))
        reference += row * min(1.0, max_norm / norm)
    assert torch.allclose(clipped.sum(dim=0), reference, rtol=1e-9, atol=1e-12)
    assert (clipped.norm(dim=1) <= max_norm * (1 + 1e-9)).all()
    short = scales < max_norm
    assert torch.allclose(clipped[short], embeddings[short])  # short rows are untouched


def test_released_sum_is_the_clipped_sum_of_the_sampled_examples(mnist_56, monkeypatch):
    """Recompute iteration 0's released class sums example by example, outside dpdm's batched path."""
    train, _ = mnist_56
    config = replace(SMALL, iterations=1, batch_size=24, max_norm=0.5)
    batches, releases = Spy(monkeypatch, "poisson_sample"), Spy(monkeypatch, "gaussian_mechanism")
    run(train, config=config, secret=SecretRandomness.fixed(11))
    assert len(batches.results) == len(releases.calls) == len(CLASSES)
    net = dpdm._fresh_network(config, MNIST, seed=0, iteration=0)  # public: the seed's first network
    for cls, indices, (args, _) in zip(CLASSES, batches.results, releases.calls):
        images = train.images[train.labels == cls][indices]
        assert len(images) > 0
        reference = torch.zeros(config.width * 16)
        with torch.no_grad():
            for image in images:
                features = net.features(image[None]).flatten()
                norm = math.sqrt(float((features.double() ** 2).sum()))
                assert norm > config.max_norm  # random-network embeddings are long: clipping normalises
                reference += features * min(1.0, config.max_norm / norm)
        (released,) = args[0]
        assert torch.allclose(released, reference, rtol=1e-4, atol=1e-5)
        assert released.norm() <= config.max_norm * len(images) * (1 + 1e-5)


# ---- releases, sampling and accounting --------------------------------------------------------


def test_one_release_per_class_and_iteration_and_the_accountant_sees_iterations(mnist_56, monkeypatch):
    train, _ = mnist_56
    config = replace(SMALL, iterations=4)
    secret = SecretRandomness.fixed(2)
    batches, releases = Spy(monkeypatch, "poisson_sample"), Spy(monkeypatch, "gaussian_mechanism")
    synthetic = run(train, config=config, secret=secret)
    record = synthetic.privacy
    assert len(releases.calls) == config.iterations * len(CLASSES)
    assert len(batches.calls) == config.iterations * len(CLASSES)
    sizes = [int((train.labels == c).sum()) for c in CLASSES]
    assert record.steps == config.iterations
    assert record.sample_rate == pytest.approx(config.batch_size / min(sizes))
    assert record.dataset_size == sum(sizes) and record.max_grad_norm == config.max_norm
    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.epsilon <= 10.0
    expected = private_record(10.0, 1e-5, record.sample_rate, config.iterations, "rdp")
    assert record.noise_multiplier == expected.noise_multiplier
    assert record.delta == 1e-5 and record.accountant == config.accountant == "rdp"
    assert record.mechanism == "subsampled-gaussian" and record.adjacency == "add-remove"
    for args, _ in releases.calls:  # std = sigma C, drawn from the secret noise stream
        assert args[1] == pytest.approx(record.noise_multiplier * config.max_norm)
        assert args[2] is secret.noise
    for args, _ in batches.calls:  # every class at the shared rate, from the secret sampling stream
        assert args[1] == record.sample_rate and args[2] is secret.sampling


def test_poisson_batch_sizes_match_the_rate(mnist_56):
    n, batch = 5421, 64
    q = batch / n
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([len(poisson_sample(n, q, generator)) for _ in range(2000)], dtype=torch.float64)
    standard_error = math.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(sizes.mean().item() - n * q) < 5 * standard_error
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.15)
    draw = poisson_sample(n, q, generator)
    assert draw.unique().numel() == draw.numel() and (draw >= 0).all() and (draw < n).all()


def test_non_private_reference_releases_nothing(mnist_56, monkeypatch):
    releases = Spy(monkeypatch, "gaussian_mechanism")
    synthetic = run(mnist_56[0], epsilon=math.inf)
    assert releases.calls == []
    assert synthetic.privacy.epsilon == math.inf and synthetic.privacy.noise_multiplier == 0.0


# ---- secret versus public randomness ----------------------------------------------------------


def test_fresh_secrets_release_different_sets_and_a_pinned_secret_reproduces(mnist_56):
    train, _ = mnist_56
    pinned = [run(train, secret=SecretRandomness.fixed(5)) for _ in range(2)]
    assert torch.equal(pinned[0].images, pinned[1].images)  # unit-level reproducibility only
    fresh = []
    for _ in range(2):
        torch.manual_seed(0)  # neither the public seed nor the global RNG may determine the release
        fresh.append(run(train))
    assert not torch.allclose(fresh[0].images, fresh[1].images)
    assert not torch.allclose(fresh[0].images, pinned[0].images)


def test_set_shape_labels_and_record(mnist_56):
    synthetic = run(mnist_56[0])
    assert synthetic.images.shape == (len(CLASSES) * SMALL.spc, 1, 28, 28)
    assert synthetic.labels.tolist() == [5] * SMALL.spc + [6] * SMALL.spc
    assert synthetic.privacy.steps == SMALL.iterations and synthetic.model_state is None
    assert torch.isfinite(synthetic.images).all()


# ---- augmentation and embeddings --------------------------------------------------------------


def test_siamese_augmentation_is_one_differentiable_transformation_for_all_images():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 28, 28, generator=generator)
    assert "flip" not in dsa_operations(MNIST) and "flip" in dsa_operations(dataset_spec("fmnist"))
    for op in DSA_OPERATIONS:
        augment = sample_augmentation((op,), (28, 28), generator)
        assert augment.operation == op
        out = augment(images)
        assert out.shape == images.shape
        assert torch.allclose(augment(images[:2]), out[:2], atol=1e-6)  # same transform, any batch
        synthetic = images[:3].clone().requires_grad_(True)
        augment(synthetic).sum().backward()
        assert synthetic.grad is not None and torch.isfinite(synthetic.grad).all()
    # The draws are public: the same seed gives the same stream, another seed another one,
    # and digits are never flipped.
    a, b, c = AugmentationSampler(MNIST, 3), AugmentationSampler(MNIST, 3), AugmentationSampler(MNIST, 4)
    draws = [a() for _ in range(50)]
    assert draws == [b() for _ in range(50)] and draws != [c() for _ in range(50)]
    assert {d.operation for d in draws} == set(dsa_operations(MNIST))
    assert SiameseAugmentation("crop", (0.0, 0.0))(images).equal(images)


def test_embed_is_the_input_of_the_last_linear_layer():
    x = torch.randn(4, 1, 28, 28)
    for name in ("convnet", "lenet", "mlp"):
        torch.manual_seed(0)
        model = build_model(name, 1, 10, (28, 28), width=16, depth=3)
        features = embed(model, x)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert features.shape == (4, last.in_features)
        assert torch.allclose(last(features), model(x), atol=1e-5)


def test_bad_configs_and_data_fail_early(mnist_56):
    for bad in (
        {"iterations": 0},
        {"batch_size": 0},
        {"max_norm": 0.0},
        {"lr_images": -1.0},
        {"momentum": 1.0},
        {"accountant": "nope"},
        {"model": "nope"},
    ):
        with pytest.raises(ValueError):
            replace(DPDMConfig(), **bad)
    with pytest.raises(ValueError):  # class 7 has no private example
        run(mnist_56[0], epsilon=1.0, classes=[5, 7])
    with pytest.raises(ValueError):
        run(mnist_56[0], classes=[5, 5])
    with pytest.raises(ValueError):
        run(mnist_56[0], epsilon=0.0)


# ---- utility ----------------------------------------------------------------------------------


@pytest.mark.statistical
def test_private_set_beats_its_noise_initialisation(mnist_56):
    """A weak but real utility check: eps=10 on MNIST 5 vs 6 with the tiny preset."""
    train, test = mnist_56
    synthetic = run(train, config=TINY, epsilon=10.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the public seed's initialisation, as in DPDM.release
        init = torch.randn_like(synthetic.images)
    evaluation = EvalConfig(width=16, epochs=100, augment=False, num_evals=1)
    accuracy = evaluate_training_set(ImageSet(synthetic.images, synthetic.labels), test, MNIST, evaluation).mean
    baseline = evaluate_training_set(ImageSet(init, synthetic.labels), test, MNIST, evaluation).mean
    assert accuracy > 0.85 and accuracy > baseline + 0.2, (accuracy, baseline)
