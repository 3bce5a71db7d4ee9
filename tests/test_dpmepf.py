"""DP-MEPF: bounded perceptual features, the 1/n sensitivity, the public feature network, VGG19, the pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, dpmepf, dpmerf, get_method
from fedpsg.methods.dpmepf import (
    DPMEPFConfig,
    LayerActivations,
    perceptual_features,
    public_convnet,
    vgg19_features,
)
from fedpsg.methods.dpmerf import embedding_sensitivity, mean_embedding

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = replace(get_method("dpmepf").presets["tiny"], generator_steps=60, samples_per_class=20)


def random_conv_features(seed: int = 0) -> LayerActivations:
    torch.manual_seed(seed)
    return LayerActivations(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU())
    )


def feature_map(net: LayerActivations, moments: str):
    return lambda x_flat: perceptual_features(net(x_flat.view(-1, 1, 28, 28)), moments)


# ---------------------------------------------------------------------------------------------
# Features: what bounds the sensitivity
# ---------------------------------------------------------------------------------------------


def test_layer_activations_are_every_relu_output_flattened_in_order():
    net = random_conv_features()
    x = torch.rand(5, 1, 28, 28)
    first = torch.relu(net.layers[0](x))
    second = torch.relu(net.layers[3](net.layers[2](first)))
    expected = torch.cat([first.flatten(1), second.flatten(1)], dim=1)
    assert torch.allclose(net(x), expected)
    assert net(x).shape == (5, 4 * 28 * 28 + 4 * 12 * 12)
    with pytest.raises(ValueError, match="no ReLU"):
        LayerActivations(nn.Sequential(nn.Conv2d(1, 2, 3)))


@pytest.mark.parametrize("moments", ["first", "first-and-second"])
def test_features_have_norm_at_most_one_whatever_the_activations(moments):
    activations = torch.cat([torch.randn(50, 300) * 1e3, torch.rand(50, 300) * 1e-4, torch.zeros(1, 300)])
    phi = perceptual_features(activations, moments)
    norms = phi.norm(dim=1)
    assert torch.allclose(norms[:-1], torch.ones(100), atol=1e-5) and norms[-1] == 0
    width = 300 if moments == "first" else 600
    assert phi.shape == (101, width)
    if moments == "first-and-second":  # the two moments, each of norm 1/sqrt(2)
        expected = (activations[0] ** 2) / (activations[0] ** 2).norm() / math.sqrt(2)
        assert torch.allclose(phi[0, 300:], expected, atol=1e-6)


@pytest.mark.parametrize("moments", ["first", "first-and-second"])
def test_removing_any_example_moves_the_released_sum_by_at_most_one_term(moments):
    # The release is the noisy sum divided by the public n: add/remove-one moves the sum by
    # phi(x) ⊗ e_y, of norm <= 1 -- the 1/n sensitivity embedding_sensitivity declares.
    phi = feature_map(random_conv_features(), moments)
    x = torch.cat([torch.rand(40, 784), torch.zeros(1, 784), torch.rand(1, 784) * 50])  # incl. extreme inputs
    labels = torch.randint(3, (len(x),), generator=torch.Generator().manual_seed(0))
    n = len(x)
    total = n * mean_embedding(x, labels, phi, 3)
    worst = 0.0
    for i in range(n):
        rest = torch.arange(n) != i
        smaller = (n - 1) * mean_embedding(x[rest], labels[rest], phi, 3)
        worst = max(worst, (total - smaller).norm().item())
    assert worst <= 1.0 + 1e-5 and worst > 0.99  # bounded by, and attaining, one unit-norm term
    assert embedding_sensitivity(n) == pytest.approx(1 / n)


# ---------------------------------------------------------------------------------------------
# The feature network: public data, trained once; or a VGG19 checkpoint
# ---------------------------------------------------------------------------------------------


def test_the_public_network_is_trained_on_the_other_dataset_once_and_recorded(tmp_path, data_dir, monkeypatch):
    config = DPMEPFConfig(feature_width=4, feature_epochs=1, feature_cache=str(tmp_path))
    trained = []
    real_train = dpmepf.train_classifier

    def spy(train, spec, training, **kwargs):
        trained.append((spec.name, len(train)))
        return real_train(train, spec, training, **kwargs)

    monkeypatch.setattr(dpmepf, "train_classifier", spy)
    first = public_convnet(config, "mnist", data_dir=data_dir)
    again = public_convnet(config, "mnist", data_dir=data_dir)
    assert trained == [("fmnist", 60000)]  # FashionMNIST's training split, once; the second call loads it
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    (record_file,) = tmp_path.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["public_dataset"] == "fmnist" and record["training"]["epochs"] == 1
    assert 0.3 < record["test_accuracy"] <= 1.0 and record["seconds"] > 0
    with pytest.raises(ValueError, match="party's own dataset"):
        public_convnet(replace(config, public_dataset="mnist"), "mnist", data_dir=data_dir)


def test_a_vgg19_checkpoint_is_loaded_from_a_path(tmp_path):
    from torchvision.models import vgg19

    torch.manual_seed(0)
    reference = vgg19().features
    checkpoint = tmp_path / "vgg19.pth"
    torch.save(
        {f"features.{k}": v for k, v in reference.state_dict().items()}, checkpoint
    )  # as vgg19().state_dict() names them
    loaded = vgg19_features(checkpoint)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert sum(isinstance(m, nn.ReLU) for m in loaded) == 16  # VGG19's sixteen conv layers, each tapped

    wrong = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, wrong)
    with pytest.raises(RuntimeError):
        vgg19_features(wrong)
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="no VGG19"):
        vgg19_features(wrong)
    with pytest.raises(FileNotFoundError, match="not a file"):
        vgg19_features(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------
# The whole pipeline on a real party
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_party(data_dir) -> tuple[ImageSet, ImageSet]:
    """2000 MNIST training images of classes 5 and 6, and all their test images."""
    train = load_images("mnist", train=True, data_dir=data_dir).only_classes([5, 6])
    test = load_images("mnist", train=False, data_dir=data_dir).only_classes([5, 6])
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:2000]
    return ImageSet(train.images[keep], train.labels[keep]), test


def generate(party, config, *, epsilon=10.0, secret=None, data_dir=None):
    stage = PartyStage(party, [5, 6], dataset_spec("mnist"), epsilon=epsilon, delta=1e-5, seed=0, data_dir=data_dir)
    return get_method("dpmepf").run(stage, config, secret)


def test_dpmepf_makes_one_release_and_its_generator_sees_only_that(mnist_party, data_dir, monkeypatch):
    party, test = mnist_party
    releases, seen = [], []
    real_mechanism, real_train_generator = dpmerf.gaussian_mechanism, dpmerf.train_generator

    def count(*args, **kwargs):
        releases.append((args, kwargs))
        return real_mechanism(*args, **kwargs)

    def spy(noisy_emb, feature_map, **kwargs):
        seen.append((noisy_emb, kwargs))
        return real_train_generator(noisy_emb, feature_map, **kwargs)

    monkeypatch.setattr(dpmerf, "gaussian_mechanism", count)
    monkeypatch.setattr(dpmerf, "train_generator", spy)
    release = generate(party, TINY, data_dir=data_dir)
    record = release.privacy

    assert len(releases) == 1 == record.steps and record.sample_rate == 1.0 and record.mechanism == "gaussian"
    (args, kwargs) = releases[0]
    assert args[1] == pytest.approx(record.noise_multiplier / len(party))  # sigma * (1 / n), add/remove
    assert kwargs["contribution"].bound == pytest.approx(1 / len(party))
    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.dataset_size == len(party)
    ((noisy_emb, rest),) = seen  # the released (features, classes) embedding; no image reaches the generator
    assert noisy_emb.shape[1] == 2 and not any(isinstance(v, (torch.Tensor, ImageSet)) for v in rest.values())

    assert release.images.shape == (40, 1, 28, 28) and sorted(release.labels.tolist()) == [5] * 20 + [6] * 20
    pixels = dataset_spec("mnist").to_pixels(release.images)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_dpmepf_reproduces_only_with_the_secret(mnist_party, data_dir):
    party, _ = mnist_party
    config = replace(TINY, generator_steps=5, samples_per_class=4)
    same = [generate(party, config, secret=SecretRandomness.fixed(3), data_dir=data_dir).images for _ in range(2)]
    fresh = generate(party, config, data_dir=data_dir).images
    assert torch.equal(same[0], same[1]) and not torch.allclose(same[0], fresh)


def test_dpmepf_runs_on_a_vgg19_checkpoint(mnist_party, tmp_path):
    from torchvision.models import vgg19

    party, _ = mnist_party
    torch.manual_seed(0)
    checkpoint = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in vgg19().features.state_dict().items()}, checkpoint)
    config = replace(TINY, features=str(checkpoint), generator_steps=2, batch_size=8, samples_per_class=3)
    release = generate(ImageSet(party.images[:200], party.labels[:200]), config)
    assert release.images.shape == (6, 1, 28, 28) and release.privacy.dataset_size == 200


def test_dpmepf_rejects_bad_settings():
    with pytest.raises(ValueError, match="moments"):
        DPMEPFConfig(moments="third")
    with pytest.raises(ValueError, match="feature_width"):
        DPMEPFConfig(feature_width=0)
