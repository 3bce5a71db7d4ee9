"""DP-Merf: unit-norm features, the 2/n sensitivity (bound and tightness), the Gaussian release, the pipeline."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.dp.accounting import calibrate_noise, epsilon_spent
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, dpmerf, get_method
from fedpsg.methods.dpmerf import (
    DPMERF_KERNEL_WIDTH,
    DPMerfConfig,
    draw_frequencies,
    embedding_sensitivity,
    mean_embedding,
    random_fourier_features,
    release_embedding,
    train_generator,
)

DIM = 784
WIDTH = DPMERF_KERNEL_WIDTH["fmnist"]


pytestmark = pytest.mark.usefixtures("single_thread")


def frequencies(num_features: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return draw_frequencies(num_features, DIM, WIDTH, torch.Generator().manual_seed(seed)).to(dtype)


def rff(w: torch.Tensor):
    """DP-Merf's feature map for the frequencies ``w``."""
    return partial(random_fourier_features, frequencies=w)


# ---------------------------------------------------------------------------------------------
# Features and embedding
# ---------------------------------------------------------------------------------------------


def test_features_have_unit_norm_for_any_input():
    g = torch.Generator().manual_seed(1)
    x = torch.cat(
        [
            torch.rand(50, DIM, generator=g),
            torch.zeros(1, DIM),
            torch.ones(1, DIM),
            (torch.rand(20, DIM, generator=g) > 0.5).float(),
            100 * torch.randn(20, DIM, generator=g),  # far outside pixel space: still unit norm
        ]
    )
    phi = random_fourier_features(x, frequencies())
    assert phi.shape == (len(x), 1000)
    torch.testing.assert_close(phi.norm(dim=1), torch.ones(len(x)), atol=1e-5, rtol=0)


def test_features_estimate_the_gaussian_kernel_of_the_stated_width():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, DIM, generator=g)
    y = (x + 0.4 * torch.randn(10, DIM, generator=g)).clamp(0, 1)
    phi = random_fourier_features(torch.cat([x, y]).double(), frequencies(40_000, dtype=torch.float64))
    estimate = (phi[:10] * phi[10:]).sum(dim=1)
    exact = torch.exp(-((x - y).double().norm(dim=1) ** 2) / (2 * WIDTH**2))
    assert exact.min() > 0.2  # a meaningful range of kernel values
    torch.testing.assert_close(estimate, exact, atol=0.03, rtol=0)


def test_mean_embedding_is_the_average_outer_product():
    g = torch.Generator().manual_seed(3)
    x, labels = torch.rand(300, DIM, generator=g), torch.randint(3, (300,), generator=g)
    w = frequencies()
    reference = torch.einsum("nd,nk->dk", random_fourier_features(x, w), torch.eye(3)[labels]) / 300
    emb = mean_embedding(x, labels, rff(w), num_classes=3, chunk_size=64)  # chunking must not matter
    assert emb.shape == (1000, 3)
    torch.testing.assert_close(emb, reference, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sensitivity: replace-one adjacency, n public
# ---------------------------------------------------------------------------------------------


def replace_one(x, labels, i, new_x, new_label):
    x2, labels2 = x.clone(), labels.clone()
    x2[i], labels2[i] = new_x, new_label
    return x2, labels2


def test_sensitivity_bound_holds_for_many_neighbouring_pairs():
    n, k = 40, 2
    g = torch.Generator().manual_seed(4)
    w = frequencies(dtype=torch.float64)
    x = torch.rand(n, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(k, (n,), generator=g)
    x[0], x[1] = 0.0, 1.0  # extreme images in the dataset too
    emb = mean_embedding(x, labels, rff(w), k)
    bound = embedding_sensitivity(n, "replace-one")
    candidates = [
        torch.zeros(DIM, dtype=torch.float64),
        torch.ones(DIM, dtype=torch.float64),
        1.0 - x[0],
        *(torch.rand(DIM, generator=g, dtype=torch.float64) for _ in range(20)),
        *((torch.rand(DIM, generator=g) > 0.5).double() for _ in range(20)),
    ]
    worst_same, worst_diff = 0.0, 0.0
    for i in range(n):
        for new_x in candidates[i % 3 :: 3]:
            for new_label in range(k):
                diff = (emb - mean_embedding(*replace_one(x, labels, i, new_x, new_label), rff(w), k)).norm().item()
                assert diff <= bound * (1 + 1e-9)
                if new_label == labels[i]:
                    worst_same = max(worst_same, diff)
                else:
                    # Different labels: the two terms live in orthogonal blocks, so exactly sqrt(2)/n.
                    assert diff == pytest.approx(math.sqrt(2) / n, rel=1e-9)
                    worst_diff = max(worst_diff, diff)
    assert worst_same < bound  # random replacements do not reach the worst case ...


def test_sensitivity_bound_is_attained():
    # ... but the supremum is 2/n: with y = y' the difference is ||phi(x) - phi(x')|| / n, which is 2/n
    # when phi(x') = -phi(x), i.e. W (x' - x) = pi for every frequency (500 equations, 784 unknowns).
    n, k = 40, 2
    g = torch.Generator().manual_seed(5)
    w = frequencies(dtype=torch.float64)
    x = torch.rand(n, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(k, (n,), generator=g)
    emb = mean_embedding(x, labels, rff(w), k)
    shift = torch.linalg.lstsq(w, torch.full((len(w), 1), math.pi, dtype=torch.float64)).solution.squeeze(1)
    unbounded = mean_embedding(*replace_one(x, labels, 0, x[0] + shift, labels[0]), rff(w), k)
    assert (emb - unbounded).norm().item() == pytest.approx(embedding_sensitivity(n, "replace-one"), rel=1e-9)

    # Within valid images ([0, 1] pixels) an adversary gets within a few percent of 2/n: maximise
    # ||phi(a) - phi(b)||^2 = 2 - 2 mean cos(W (a - b)) over a - b in [-1, 1]^784.
    u = torch.randn(DIM, generator=g, dtype=torch.float64).mul(2).requires_grad_()
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        torch.cos(w @ torch.tanh(u)).mean().backward()
        opt.step()
    delta = torch.tanh(u).detach()
    a, b = delta.clamp(max=0).neg(), delta.clamp(min=0)  # both in [0, 1], b - a = delta
    x[0] = a
    emb = mean_embedding(x, labels, rff(w), k)
    diff = (emb - mean_embedding(*replace_one(x, labels, 0, b, labels[0]), rff(w), k)).norm().item()
    assert 0.9 * embedding_sensitivity(n, "replace-one") < diff <= embedding_sensitivity(n, "replace-one")
    assert diff > 1.2 * math.sqrt(2) / n  # well above the different-label case


def test_add_remove_moves_the_sum_by_exactly_one_term():
    # Add/remove adjacency: the released quantity is the noisy sum over the public n; dropping
    # any one example changes that sum by phi(x) ⊗ e_y, whose norm is 1, i.e. the mean by 1/n.
    n, k, w = 40, 3, frequencies()
    g = torch.Generator().manual_seed(9)
    x, labels = torch.rand(n, DIM, generator=g), torch.randint(k, (n,), generator=g)
    total = n * mean_embedding(x, labels, rff(w), k)
    for i in range(n):
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, n)])
        smaller = (n - 1) * mean_embedding(x[rest], labels[rest], rff(w), k)
        assert (total - smaller).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert embedding_sensitivity(n) == pytest.approx(1.0 / n)


def test_sensitivity_rejects_empty_dataset():
    with pytest.raises(ValueError):
        embedding_sensitivity(0)


# ---------------------------------------------------------------------------------------------
# The Gaussian release
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 10.0])
def test_calibrated_sigma_spends_exactly_epsilon(epsilon):
    _, record = release_embedding(torch.zeros(10, 2), 100, epsilon=epsilon, delta=1e-5)
    assert epsilon_spent(record.noise_multiplier, 1.0, 1, 1e-5) == pytest.approx(epsilon, rel=1e-3)
    assert record.epsilon == pytest.approx(epsilon, rel=1e-3) and record.epsilon <= epsilon
    assert (record.mechanism, record.steps, record.sample_rate, record.delta) == ("gaussian", 1, 1.0, 1e-5)


@pytest.mark.parametrize(("adjacency", "sensitivity_times_n"), [("add-remove", 1.0), ("replace-one", 2.0)])
def test_release_noise_has_std_sigma_times_sensitivity(adjacency, sensitivity_times_n):
    n = 250
    emb = mean_embedding(torch.rand(n, DIM), torch.randint(2, (n,)), rff(frequencies()), 2)
    rng = torch.Generator().manual_seed(6)
    noise = []
    for _ in range(50):  # 50 releases x 2000 entries
        noisy, record = release_embedding(emb, n, epsilon=1.0, delta=1e-5, generator=rng, adjacency=adjacency)
        noise.append(noisy - emb)
    noise = torch.stack(noise).double()
    assert record.adjacency == adjacency and record.dataset_size == n
    # One unit-norm term per example: adding/removing one moves the noisy sum by 1 (the mean by
    # 1/n); replacing one moves the mean by up to 2/n. Written from the definition, not the code.
    expected = calibrate_noise(1.0, 1e-5, 1.0, 1) * sensitivity_times_n / n
    assert noise.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean().item()) < 0.01 * expected
    assert not torch.equal(noise[0], noise[1])  # fresh noise per release


def test_release_is_reproducible_and_exact_without_privacy():
    emb = torch.rand(10, 2)
    a, _ = release_embedding(emb, 100, epsilon=1.0, delta=1e-5, generator=torch.Generator().manual_seed(0))
    b, _ = release_embedding(emb, 100, epsilon=1.0, delta=1e-5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    clean, record = release_embedding(emb, 100, epsilon=math.inf, delta=1e-5)
    assert torch.equal(clean, emb) and math.isinf(record.epsilon) and record.noise_multiplier == 0.0


@pytest.mark.parametrize(("epsilon", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1.5)])
def test_release_rejects_bad_budget(epsilon, delta):
    with pytest.raises(ValueError):
        release_embedding(torch.zeros(4, 2), 10, epsilon=epsilon, delta=delta)


# ---------------------------------------------------------------------------------------------
# Generator: post-processing only
# ---------------------------------------------------------------------------------------------


def test_generator_trains_from_the_noisy_embedding_alone():
    # train_generator gets the released embedding and the public feature map, nothing else.
    w = frequencies()
    bright = torch.zeros(100, 28, 28)
    bright[:, 7:21, 7:21] = 1.0  # class 0: a bright square; class 1: dark images
    x = torch.cat([bright.flatten(1), torch.zeros(100, DIM)])
    labels = torch.arange(2).repeat_interleave(100)
    noisy, _ = release_embedding(mean_embedding(x, labels, rff(w), 2), 200, epsilon=10.0, delta=1e-5)
    config = DPMerfConfig(generator_steps=150, lr=0.01)
    gen = train_generator(noisy, rff(w), config=config, seed=0)
    images, out_labels = dpmerf.sample_generator(gen, 20, seed=0)
    assert images.shape == (40, DIM) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(out_labels, labels[::5])
    centre = images.view(40, 28, 28)[:, 10:18, 10:18].mean(dim=(1, 2))
    assert centre[:20].mean() > centre[20:].mean() + 0.2  # the classes were told apart


# ---------------------------------------------------------------------------------------------
# The whole pipeline on a real party
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_party(data_dir) -> tuple[ImageSet, ImageSet]:
    """3000 FashionMNIST training images of classes 5 and 6, and all their test images."""
    train = load_images("fmnist", train=True, data_dir=data_dir).only_classes([5, 6])
    test = load_images("fmnist", train=False, data_dir=data_dir).only_classes([5, 6])
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:3000]
    return ImageSet(train.images[keep], train.labels[keep]), test


TINY = DPMerfConfig(generator_steps=200, samples_per_class=50, lr=0.01)


def generate(party, classes, *, epsilon, config, seed=0, secret=None) -> Release:
    """DP-Merf on a FashionMNIST party through the base class's ``run`` (``secret=None``: fresh OS entropy)."""
    stage = PartyStage(party, classes, dataset_spec("fmnist"), epsilon=epsilon, delta=1e-5, seed=seed)
    return get_method("dpmerf").run(stage, config, secret)


def test_dpmerf_on_a_real_party(fmnist_party, monkeypatch):
    party, test = fmnist_party
    seen = []
    real_train_generator = dpmerf.train_generator

    def spy(noisy_emb, feature_map, **kwargs):
        seen.append((noisy_emb, feature_map, kwargs))
        return real_train_generator(noisy_emb, feature_map, **kwargs)

    monkeypatch.setattr(dpmerf, "train_generator", spy)
    synthetic = generate(party, [5, 6], epsilon=10.0, config=TINY)
    record = synthetic.privacy

    # The generator saw the released (D, classes) embedding and the frequencies, never an image.
    ((noisy_emb, feature_map, kwargs),) = seen
    assert noisy_emb.shape == (1000, 2) and feature_map.keywords["frequencies"].shape == (500, DIM)
    assert not any(isinstance(v, (torch.Tensor, ImageSet)) for v in kwargs.values())

    assert record.epsilon == pytest.approx(10.0, rel=1e-3) and record.mechanism == "gaussian"
    assert synthetic.images.shape == (100, 1, 28, 28) and synthetic.images.dtype == torch.float32
    assert sorted(synthetic.labels.tolist()) == [5] * 50 + [6] * 50
    spec = dataset_spec("fmnist")
    pixels = synthetic.images * spec.std[0] + spec.mean[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # normalised like the real data

    # A linear classifier trained on the 100 synthetic images beats chance on the real test images.
    torch.manual_seed(0)
    clf = torch.nn.Linear(DIM, 10)
    opt = torch.optim.Adam(clf.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(synthetic.images.flatten(1)), synthetic.labels).backward()
        opt.step()
    with torch.no_grad():
        logits = clf(test.images.flatten(1))[:, [5, 6]]
    accuracy = (torch.tensor([5, 6])[logits.argmax(dim=1)] == test.labels).float().mean().item()
    assert accuracy > 0.75, accuracy


def test_dpmerf_reproduces_only_with_the_secret(fmnist_party):
    party, _ = fmnist_party
    config = DPMerfConfig(generator_steps=10, samples_per_class=5)
    runs = [
        generate(party, [5, 6], epsilon=1.0, config=config, seed=0, secret=s)
        for s in (SecretRandomness.fixed(1), SecretRandomness.fixed(1), None, None)
    ]
    assert torch.equal(runs[0].images, runs[1].images) and torch.equal(runs[0].labels, runs[1].labels)
    assert not torch.equal(runs[2].images, runs[3].images)  # same public seed, fresh secrets


def test_collapsed_classes_are_those_whose_samples_are_all_one_image():
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(9, DIM, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    flat[3:6] = 0.0  # class 1: three black images
    flat[6:8] = flat[6]  # class 2: one image twice
    flat[7, 0] += 1e-3  # ... but for one pixel: not collapsed
    assert dpmerf.collapsed_classes(flat, labels) == [1]  # class 3 has a single sample: no verdict
    flat[7, 0] = flat[6, 0]
    assert dpmerf.collapsed_classes(flat, labels) == [1, 2]


def collapsed_generator(num_classes: int) -> dpmerf.ConditionalGenerator:
    """A generator whose sigmoid is saturated: every output pixel is sigmoid(-100) whatever the input."""
    gen = dpmerf.ConditionalGenerator(5, num_classes)
    last = gen.conv[-2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-100.0)
    return gen.eval()


@pytest.mark.parametrize("refits", [2, 0])
def test_a_collapsed_generator_is_fitted_again_without_a_new_release(fmnist_party, monkeypatch, capsys, refits):
    party, _ = fmnist_party
    config = DPMerfConfig(generator_steps=20, samples_per_class=5, lr=0.01, refits_on_collapse=refits)
    releases, seeds = [], []
    real_mechanism, real_train_generator = dpmerf.gaussian_mechanism, dpmerf.train_generator

    def count(*args, **kwargs):
        releases.append(args)
        return real_mechanism(*args, **kwargs)

    def collapse_first(noisy_emb, feature_map, **kwargs):
        seeds.append(kwargs["seed"])
        if len(seeds) == 1:
            return collapsed_generator(noisy_emb.shape[1])
        return real_train_generator(noisy_emb, feature_map, **kwargs)

    monkeypatch.setattr(dpmerf, "gaussian_mechanism", count)
    monkeypatch.setattr(dpmerf, "train_generator", collapse_first)
    release = generate(party, [5, 6], epsilon=1.0, config=config, seed=7)
    out = capsys.readouterr().out

    assert len(releases) == 1 and release.privacy.steps == 1  # one release whatever the fits
    pixels = release.images.flatten(1)
    if refits:
        assert seeds == [7, 7 + dpmerf.REFIT_SEED_STRIDE]  # a second fit from another public seed, then stop
        assert "the generator collapsed (every sample of class 5, 6 is one image)" in out and "1 of 2" in out
        assert pixels.std(dim=0).max() > 0.01  # the released samples differ
    else:
        assert seeds == [7]
        assert "WARNING: the generator collapsed" in out
        assert torch.equal(pixels, pixels[:1].expand_as(pixels))  # released as it is


def test_dpmerf_rejects_bad_input(fmnist_party):
    party, _ = fmnist_party
    config = DPMerfConfig(generator_steps=1, samples_per_class=1)
    with pytest.raises(ValueError):  # labels 6 are outside the stated classes
        generate(party, [5], epsilon=1.0, config=config)
    with pytest.raises(ValueError):
        generate(party, [5, 6], epsilon=0.0, config=config)
    with pytest.raises(ValueError):
        DPMerfConfig(num_features=999)
    with pytest.raises(ValueError):
        DPMerfConfig(refits_on_collapse=-1)


def test_default_kernel_widths_are_dp_merfs():
    # DP-Merf: omega = randn / sqrt(rff_sigma), rff_sigma = 105 (MNIST) / 127 (FashionMNIST).
    assert DPMerfConfig().resolved_kernel_width("mnist") == pytest.approx(math.sqrt(105))
    assert DPMerfConfig().resolved_kernel_width("fashion-mnist") == pytest.approx(math.sqrt(127))
    assert DPMerfConfig(kernel_width=3.0).resolved_kernel_width("mnist") == 3.0
