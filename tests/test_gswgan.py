"""GS-WGAN (fedpsg.methods.gswgan): sanitisation, releases vs accounting, the split, secrets, utility."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.accounting import epsilon_spent
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, get_method, gswgan
from fedpsg.methods.gswgan import GSWGAN_PRESETS, assign_subsets, clip_per_sample, step_sensitivity
from fedpsg.nn.evaluation import EvalConfig, evaluate_training_set, new_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST = dataset_spec("mnist")
CLASSES = [5, 6]
TINY = GSWGAN_PRESETS["tiny"]
EPSILON, DELTA = 10.0, 1e-5


def generate(train, config, *, epsilon=EPSILON, seed=0, secret=None) -> Release:
    """GS-WGAN on classes 5 and 6 through the base class's ``run`` (``secret=None``: fresh OS entropy)."""
    stage = PartyStage(train, CLASSES, MNIST, epsilon=epsilon, delta=DELTA, seed=seed, progress_interval=math.inf)
    return get_method("gswgan").run(stage, config, secret)


@pytest.fixture(scope="module")
def mnist_56(data_dir) -> tuple[ImageSet, ImageSet]:
    train = load_images("mnist", True, data_dir).only_classes(CLASSES)
    test = load_images("mnist", False, data_dir).only_classes(CLASSES)
    return train, test


@pytest.fixture(scope="module")
def small_train(mnist_56) -> ImageSet:
    train, _ = mnist_56
    return ImageSet(train.images[:600], train.labels[:600])


# ---- sanitisation ------------------------------------------------------------------------------


def test_clip_per_sample_against_the_definition():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.0, 1e-3, 0.5, 0.999, 1.0, 1.001, 2.0, 37.0, 1e4]).repeat_interleave(3)
    gradients = torch.randn(len(scales), 1, 28, 28, generator=generator, dtype=torch.float64)
    gradients = gradients / gradients.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * scales.view(-1, 1, 1, 1).double()
    max_norm = 1.0
    clipped = clip_per_sample(gradients, max_norm)
    assert clipped.shape == gradients.shape
    for row, out in zip(gradients, clipped):
        norm = math.sqrt(sum(float(v) ** 2 for v in row.flatten()))  # independently of the code under test
        after = math.sqrt(sum(float(v) ** 2 for v in out.flatten()))
        assert after <= max_norm * (1 + 1e-9)
        if norm < max_norm * (1 - 1e-12):
            assert torch.equal(out, row)  # gradients within the bound are left exactly as they are
        elif norm <= max_norm * (1 + 1e-12):
            assert torch.allclose(out, row, rtol=1e-12, atol=0)  # on the sphere, up to rounding of the norm
        else:
            assert torch.allclose(out, row * (max_norm / norm), rtol=1e-9, atol=0)
            assert after == pytest.approx(max_norm, rel=1e-9)  # clipped onto the sphere, direction kept


def test_step_sensitivity_bounds_any_two_critics_and_is_attained():
    # The rows of one step all come from one critic, which adding an example can change arbitrarily:
    # every clipped row may move by 2C, so the (B, d) release moves by up to 2 C sqrt(B) -- not C.
    batch, max_norm = 16, 1.5
    generator = torch.Generator().manual_seed(1)
    bound = step_sensitivity(max_norm, batch)
    assert bound == pytest.approx(2 * max_norm * math.sqrt(batch))
    for scale in (0.1, 1.0, 100.0):
        first = clip_per_sample(scale * torch.randn(batch, 1, 28, 28, generator=generator), max_norm)
        second = clip_per_sample(scale * torch.randn(batch, 1, 28, 28, generator=generator), max_norm)
        assert (first - second).norm().item() <= bound * (1 + 1e-6)
    worst = clip_per_sample(torch.randn(batch, 1, 28, 28, generator=generator) * 10, max_norm)
    assert (worst - (-worst)).norm().item() == pytest.approx(bound, rel=1e-5)


def test_the_split_is_disjoint_complete_and_stable_when_an_example_is_added():
    n, k = 1000, 7
    subsets = assign_subsets(n, k, torch.Generator().manual_seed(3))
    assert len(subsets) == k
    assert torch.equal(torch.cat(subsets).sort().values, torch.arange(n))  # disjoint and covering
    # Add/remove adjacency: with the same secret draws, one more example leaves every other one's
    # subset unchanged (equal chunks of a permutation would reshuffle them all).
    grown = assign_subsets(n + 1, k, torch.Generator().manual_seed(3))
    owner = {int(i): s for s, members in enumerate(subsets) for i in members}
    grown_owner = {int(i): s for s, members in enumerate(grown) for i in members}
    assert all(grown_owner[i] == owner[i] for i in range(n))
    # Drawn from the given (secret) stream, not a fixed pattern.
    assert any(not torch.equal(a, b) for a, b in zip(subsets, assign_subsets(n, k, torch.Generator().manual_seed(4))))


def test_the_public_stream_does_not_depend_on_how_many_examples_a_subset_holds():
    # Neighbouring datasets: one example added to an empty subset, then one more to a non-empty
    # one. Subsets hold fewer than a batch, so a data-dependent draw count would show up.
    config = replace(TINY, batch_size=4)
    pixels = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    neighbours = [
        [[], [0, 1], [2, 3, 4, 5]],
        [[6], [0, 1], [2, 3, 4, 5]],
        [[6], [0, 1, 7], [2, 3, 4, 5]],
    ]
    states = []
    for subsets in neighbours:
        secret = SecretRandomness.fixed(1)
        trainer = gswgan.GSWGANTrainer(pixels, labels, 2, config, device="cpu", seed=5, secret=secret)
        critics = [trainer.new_critic(i, torch.tensor(s, dtype=torch.long)) for i, s in enumerate(subsets)]
        generator = trainer.new_generator(0)
        for _ in range(2):
            for critic in critics:
                trainer.critic_update(critic, generator)
        states.append(trainer.public.get_state())
    assert all(torch.equal(state, states[0]) for state in states[1:])


# ---- releases counted at the mechanism ----------------------------------------------------------


@pytest.fixture(scope="module")
def counted_run(small_train):
    """One tiny private run with every call of gaussian_mechanism recorded (arguments and noise drawn)."""
    calls: list[dict] = []
    original = gswgan.gaussian_mechanism

    def recording(values, std, generator, **kwargs):
        noisy = original(values, std, generator, **kwargs)
        calls.append({"values": [v.detach().clone() for v in values], "std": std, "generator": generator,
                      "noise": [(n - v).detach() for n, v in zip(noisy, values)]})  # fmt: skip
        return noisy

    # C far below the critics' input-gradient norms (about 1 under the gradient penalty): clipping must act.
    config = replace(TINY, num_discriminators=10, generator_iterations=9, max_grad_norm=0.01)
    secret = SecretRandomness.fresh()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gswgan, "gaussian_mechanism", recording)
        record = generate(small_train, config, secret=secret).privacy
    return config, secret, calls, record


def test_one_release_per_generator_step_at_the_accounted_rate(counted_run, small_train):
    config, _, calls, record = counted_run
    assert len(calls) == record.steps == config.generator_iterations
    assert record.sample_rate == pytest.approx(1 / config.num_discriminators)
    assert record.max_grad_norm == config.max_grad_norm and record.dataset_size == len(small_train)
    assert record.adjacency == "add-remove"
    spent = epsilon_spent(record.noise_multiplier, 1 / config.num_discriminators, len(calls), DELTA, record.accountant)
    assert spent <= EPSILON * (1 + 1e-9)
    assert record.epsilon <= EPSILON * (1 + 1e-9)


def test_every_release_is_clipped_per_sample_before_the_noise(counted_run):
    config, _, calls, _ = counted_run
    for call in calls:
        (released,) = call["values"]
        assert released.shape == (config.batch_size, 1, 28, 28)  # one gradient per generated sample
        norms = released.flatten(1).norm(dim=1)
        assert (norms <= config.max_grad_norm * (1 + 1e-5)).all()
        assert norms.max().item() == pytest.approx(config.max_grad_norm, rel=1e-4)  # clipped onto the bound


def test_the_noise_std_is_sigma_times_the_step_sensitivity(counted_run):
    config, secret, calls, record = counted_run
    expected = record.noise_multiplier * step_sensitivity(config.max_grad_norm, config.batch_size)
    assert record.noise_multiplier > 0
    for call in calls:
        assert call["std"] == pytest.approx(expected)
        assert call["generator"] is secret.noise  # the party's secret noise stream
    noise = torch.cat([call["noise"][0].flatten() for call in calls])
    assert noise.std().item() == pytest.approx(expected, rel=0.02)  # what was actually added
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(len(noise))


def test_all_private_randomness_comes_from_the_secret_streams(small_train):
    # Non-private, so no noise: what remains random is the split, the picks and the critics' batches.
    # With the same public seed, the same secret seeds reproduce the release exactly (nothing is drawn
    # from the global RNG or elsewhere), and other secret seeds change it (they are drawn from the
    # secret sampling stream, not from the public seed).
    config = replace(TINY, num_discriminators=3, pretrain_iterations=1, generator_iterations=4, samples_per_class=3)

    def release(secret_seed: int) -> torch.Tensor:
        return generate(
            small_train, config, epsilon=math.inf, seed=5, secret=SecretRandomness.fixed(secret_seed)
        ).images

    first = release(1)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, release(1))
    assert not torch.allclose(first, release(2))


def test_the_non_private_reference_adds_no_noise(monkeypatch, small_train):
    calls = []
    monkeypatch.setattr(gswgan, "gaussian_mechanism", lambda *args, **kwargs: calls.append(args))
    config = replace(TINY, num_discriminators=2, pretrain_iterations=1, generator_iterations=3)
    record = generate(small_train, config, epsilon=math.inf).privacy
    assert calls == [] and record.noise_multiplier == 0.0 and math.isinf(record.epsilon)


# ---- the method end to end -----------------------------------------------------------------------


def stage_for(train: ImageSet, seed: int = 7) -> PartyStage:
    evaluation = get_method("gswgan").evaluation["tiny"]
    return PartyStage(
        data=train,
        classes=CLASSES,
        spec=MNIST,
        epsilon=EPSILON,
        delta=DELTA,
        seed=seed,
        model=new_classifier(MNIST, evaluation),
        label="[test] gswgan",
        progress_interval=1e9,
    )


def test_a_tiny_stage_releases_a_labelled_normalised_set_and_identical_requests_differ(mnist_56):
    train, _ = mnist_56
    method = get_method("gswgan")
    assert method.releases == "synthetic"
    stage = stage_for(train)
    first, second = method.run(stage, TINY), method.run(stage, TINY)
    per_class = TINY.released_per_class
    assert first.images.shape == (2 * per_class, 1, 28, 28)
    assert sorted(first.labels.tolist()) == [5] * per_class + [6] * per_class
    low, high = (MNIST.normalise(torch.full((1, 1, 1, 1), v)).item() for v in (0.0, 1.0))
    assert first.images.min().item() >= low - 1e-5 and first.images.max().item() <= high + 1e-5
    assert first.images.std().item() > 0  # not a constant image
    record = first.privacy
    assert record.epsilon <= EPSILON * (1 + 1e-9) and record.delta == DELTA
    assert record.steps == TINY.generator_iterations and record.dataset_size == len(train)
    # Same request, same public seed: the secret split, picks and noise make the releases differ.
    assert not torch.allclose(first.images, second.images)


def test_spc_sets_the_release_size_unless_samples_per_class_is_given(small_train):
    config = replace(TINY, num_discriminators=2, pretrain_iterations=0, generator_iterations=1, samples_per_class=None)
    # The scenario's spc (e.g. --spc 3) sets the size while samples_per_class is null ...
    generated = generate(small_train, replace(config, spc=3), epsilon=math.inf)
    assert generated.labels.tolist() == [5, 5, 5, 6, 6, 6] and len(generated.images) == 6
    # ... and samples_per_class wins when it is set.
    generated = generate(small_train, replace(config, spc=3, samples_per_class=2), epsilon=math.inf)
    assert generated.labels.tolist() == [5, 5, 6, 6] and len(generated.images) == 4
    with pytest.raises(ValueError):
        replace(config, samples_per_class=0)
    with pytest.raises(ValueError):
        replace(config, num_discriminators=0)


def test_a_short_non_private_run_generates_images_a_classifier_learns_from(mnist_56):
    train, test = mnist_56
    config = replace(
        GSWGAN_PRESETS["cpu"],
        num_discriminators=2,
        pretrain_iterations=10,
        generator_iterations=300,
        critic_iterations=2,
        samples_per_class=100,
    )
    release = generate(train, config, epsilon=math.inf, seed=1)
    generated = ImageSet(release.images, release.labels)
    result = evaluate_training_set(generated, test, MNIST, EvalConfig(width=16, epochs=20, augment=False, num_evals=1))
    assert result.mean > 0.8  # chance is 0.5 on two classes
