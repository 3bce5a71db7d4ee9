"""DP-GAN-DPAC (fedpsg.methods.dpac): the classifier's terms, GS-WGAN's mechanism unchanged, secrets."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, get_method, gswgan
from fedpsg.methods.dpac import AuxiliaryClassifier, ClassifiedCritic, DPACConfig, DPACTrainer, last_layer_gradients
from fedpsg.nn import gan

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST = dataset_spec("mnist")
CLASSES = [5, 6]
TINY = get_method("dpac").presets["tiny"]
EPSILON, DELTA = 10.0, 1e-5


@pytest.fixture(scope="module")
def small_train(data_dir) -> ImageSet:
    train = load_images("mnist", True, data_dir).only_classes(CLASSES)
    return ImageSet(train.images[:600], train.labels[:600])


def generate(train: ImageSet, config: DPACConfig, *, epsilon=EPSILON, seed=0, secret=None) -> Release:
    stage = PartyStage(train, CLASSES, MNIST, epsilon=epsilon, delta=DELTA, seed=seed, progress_interval=math.inf)
    return get_method("dpac").run(stage, config, secret)


def trainer_with_critic(
    config: DPACConfig, subset: list[int], seed: int = 5, pixels: torch.Tensor | None = None
) -> tuple[DPACTrainer, ClassifiedCritic]:
    if pixels is None:
        pixels = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    trainer = DPACTrainer(pixels, labels, 2, config, device="cpu", seed=seed, secret=SecretRandomness.fixed(1))
    return trainer, trainer.new_critic(0, torch.tensor(subset, dtype=torch.long))


def test_last_layer_gradients_are_each_samples_own_autograd_gradient():
    torch.manual_seed(0)
    classifier = AuxiliaryClassifier(num_classes=3, width=4)
    images, labels = torch.rand(5, 1, 28, 28), torch.tensor([0, 2, 1, 1, 0])
    features, logits = classifier(images)
    closed_form = last_layer_gradients(features, logits, labels)
    for i in range(len(images)):
        loss = F.cross_entropy(classifier(images[i : i + 1])[1], labels[i : i + 1])
        weight, bias = torch.autograd.grad(loss, [classifier.head.weight, classifier.head.bias])
        assert torch.allclose(closed_form[i], torch.cat([weight.flatten(), bias]), atol=1e-6)


def test_the_released_rows_are_the_gradients_of_the_documented_per_sample_loss():
    # L_i = -D(x_i, y_i) + r2g * CE(A(x_i), y_i) + g2r * (1 - cos(g_real, g(x_i, y_i))), with g(x_i, y_i)
    # the head's gradient from autograd (not the closed form), one sample at a time.
    config = replace(TINY, r2g_weight=0.7, g2r_weight=2.0)
    trainer, critic = trainer_with_critic(config, [0, 1, 2, 3])
    trainer.critic_update(critic, trainer.new_generator(0))
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 0, 1, 1, 0])
    rows = trainer.loss_gradients(critic, images, labels)
    head = [critic.classifier.head.weight, critic.classifier.head.bias]
    for i in range(len(images)):
        x = images[i : i + 1].clone().requires_grad_(True)
        cross_entropy = F.cross_entropy(critic.classifier(x)[1], labels[i : i + 1])
        weight, bias = torch.autograd.grad(cross_entropy, head, create_graph=True)
        own = torch.cat([weight.flatten(), bias])
        distance = 1 - F.cosine_similarity(own, critic.real_gradient, dim=0)
        loss = -critic.net(x, labels[i : i + 1]).sum() + 0.7 * cross_entropy + 2.0 * distance
        (expected,) = torch.autograd.grad(loss, x)
        assert torch.allclose(rows[i], expected[0], atol=1e-5), i


def test_without_the_classifier_terms_the_generator_gradient_is_gswgans():
    config = replace(TINY, r2g_weight=0.0, g2r_weight=0.0)
    trainer, critic = trainer_with_critic(config, [0, 1, 2, 3])
    trainer.critic_update(critic, trainer.new_generator(0))
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 0, 1, 1, 0])
    plain = gan.generator_loss_gradients(critic.net, images, labels)
    assert torch.equal(trainer.loss_gradients(critic, images, labels), plain)


def test_an_empty_subsets_untrained_classifier_adds_nothing():
    trainer, critic = trainer_with_critic(TINY, [])
    trainer.critic_update(critic, trainer.new_generator(0))
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 0, 1, 1, 0])
    plain = gan.generator_loss_gradients(critic.net, images, labels)
    assert critic.real_gradient is None and torch.equal(trainer.loss_gradients(critic, images, labels), plain)


def test_each_row_of_the_released_gradient_depends_on_its_own_sample_only():
    # What GS-WGAN's sensitivity argument needs: B rows, one per generated sample.
    trainer, critic = trainer_with_critic(TINY, [0, 1, 2, 3])
    trainer.critic_update(critic, trainer.new_generator(0))
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 0, 1, 1, 0])
    changed = images.clone()
    changed[0] = torch.rand(1, 28, 28)
    first, second = trainer.loss_gradients(critic, images, labels), trainer.loss_gradients(critic, changed, labels)
    assert not torch.allclose(first[0], second[0])
    assert torch.allclose(first[1:], second[1:], atol=1e-6)


def test_a_classifier_learns_only_from_its_critics_subset():
    pixels = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    other = pixels.clone()
    other[4:] = torch.rand(4, 1, 28, 28)  # differs only outside the subset
    states = []
    for data in (pixels, other, pixels + 0.01):
        trainer, critic = trainer_with_critic(TINY, [0, 1, 2, 3], pixels=data)
        trainer.critic_update(critic, trainer.new_generator(0))
        states.append((critic.classifier.head.weight.detach().clone(), critic.real_gradient))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert not torch.equal(states[0][0], states[2][0])  # ... and does learn from the subset


@pytest.mark.parametrize(
    "sequential,events",
    [
        (True, ["forward 16", "step", "forward 4", "step", "forward 4"]),
        (False, ["forward 16", "forward 4", "step", "forward 4"]),
    ],
)
def test_the_classifier_learns_from_generated_then_real_data_or_from_both_at_once(monkeypatch, sequential, events):
    config = replace(TINY, sequential=sequential, batch_size=16)
    trainer, critic = trainer_with_critic(config, [0, 1, 2, 3])
    log: list[str] = []
    forward, step = critic.classifier.forward, critic.classifier_optimizer.step
    monkeypatch.setattr(
        critic.classifier, "forward", lambda images: log.append(f"forward {len(images)}") or forward(images)
    )
    monkeypatch.setattr(critic.classifier_optimizer, "step", lambda *a, **k: log.append("step") or step(*a, **k))
    trainer.critic_update(critic, trainer.new_generator(0))
    # A generated batch (16), the subset's real batch (4 images), then the real batch again for g_real.
    assert log == events


def test_the_method_runs_dpacs_trainer(monkeypatch, small_train):
    calls = []
    original = DPACTrainer.loss_gradients
    monkeypatch.setattr(DPACTrainer, "loss_gradients", lambda self, *a: calls.append(1) or original(self, *a))
    config = replace(TINY, num_discriminators=2, pretrain_iterations=1, generator_iterations=3)
    generate(small_train, config)
    assert len(calls) == 2 * 1 + 3  # each warm-start iteration and each private step


def test_the_public_stream_does_not_depend_on_how_many_examples_a_subset_holds():
    states = []
    for subset in ([], [0], [0, 1, 2]):
        trainer, critic = trainer_with_critic(replace(TINY, batch_size=4), subset)
        generator = trainer.new_generator(0)
        for _ in range(2):
            trainer.critic_update(critic, generator)
        states.append(trainer.public.get_state())
    assert all(torch.equal(state, states[0]) for state in states[1:])


def test_one_release_per_generator_step_clipped_and_noised_as_gswgans(monkeypatch, small_train):
    calls = []
    original = gswgan.gaussian_mechanism

    def recording(values, std, generator, **kwargs):
        calls.append({"rows": values[0].detach().clone(), "std": std, "generator": generator})
        return original(values, std, generator, **kwargs)

    monkeypatch.setattr(gswgan, "gaussian_mechanism", recording)
    config = replace(TINY, num_discriminators=10, generator_iterations=7, max_grad_norm=0.01)
    secret = SecretRandomness.fresh()
    record = generate(small_train, config, secret=secret).privacy
    assert len(calls) == record.steps == config.generator_iterations
    assert record.sample_rate == pytest.approx(1 / config.num_discriminators)
    # GS-WGAN's release per step: B rows, sensitivity 2 C sqrt(B), so the noise std is sigma * 2 C sqrt(B).
    expected_std = record.noise_multiplier * 2 * config.max_grad_norm * math.sqrt(config.batch_size)
    for call in calls:
        norms = call["rows"].flatten(1).norm(dim=1)
        assert call["rows"].shape == (config.batch_size, 1, 28, 28)
        assert (norms <= config.max_grad_norm * (1 + 1e-5)).all()
        assert call["std"] == pytest.approx(expected_std) and call["generator"] is secret.noise


def test_only_the_secret_reproduces_a_release(small_train):
    config = replace(TINY, num_discriminators=3, pretrain_iterations=1, generator_iterations=4, samples_per_class=3)

    def release(secret_seed: int) -> torch.Tensor:
        secret = SecretRandomness.fixed(secret_seed)
        return generate(small_train, config, epsilon=math.inf, seed=5, secret=secret).images

    first = release(1)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, release(1))
    assert not torch.allclose(first, release(2))


def test_a_release_is_a_labelled_set_in_the_datas_range(small_train):
    release = generate(small_train, TINY)
    per_class = TINY.released_per_class
    assert release.images.shape == (2 * per_class, 1, 28, 28)
    assert sorted(release.labels.tolist()) == [5] * per_class + [6] * per_class
    low, high = (MNIST.normalise(torch.full((1, 1, 1, 1), v)).item() for v in (0.0, 1.0))
    assert release.images.min().item() >= low - 1e-5 and release.images.max().item() <= high + 1e-5


def test_bad_settings_are_refused():
    for bad in ({"r2g_weight": -1.0}, {"g2r_weight": -0.1}, {"lr_classifier": 0.0}):
        with pytest.raises(ValueError):
            replace(TINY, **bad)
