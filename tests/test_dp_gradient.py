"""Checks of the DP real-data gradient against per-example gradients computed one example at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.dp import gradients as dp_gradient
from fedpsg.dp.gradients import clipped_gradient_sum, per_example_gradients, private_gradient
from fedpsg.nn.models import build_model

# The asymmetric padding="same" convolution below is deliberate.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def reference_per_example(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per-example gradients by plain autograd, one example per backward; shape (B, *param.shape) per param."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for image, label in zip(images, labels):
        loss = F.cross_entropy(model(image[None]), label[None])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return [torch.stack(column) for column in zip(*rows)]


def reference_clipped_sum(
    per_example: list[torch.Tensor], max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example], dim=1).norm(dim=1)
    factor = (max_grad_norm / norms).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor, g) for g in per_example], norms


class OddConvs(nn.Module):
    """Convolutions off the ConvNet's beaten path: stride, groups, dilation, no bias, reflect padding,
    plus a linear layer applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(2, 6, 3, stride=2, padding=1, groups=2, bias=False)
        self.dilated = nn.Conv2d(6, 4, 3, padding=2, dilation=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, (2, 3), padding="same")
        self.norm = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(4 * 6 * 6, 4 * 6 * 6)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.norm(self.same(self.reflect(torch.tanh(self.dilated(torch.tanh(self.strided(x))))))))
        x = x.flatten(1)
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def make_case(name: str, batch: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "odd":
        model, shape, classes = OddConvs(), (2, 12, 12), 3
    elif name == "convnet32":  # 3-channel 32x32: padding 1 in the first block; channels-last below
        model, shape, classes = build_model("convnet", 3, 10, (32, 32), width=8), (3, 32, 32), 10
    else:
        model, shape, classes = build_model(name, 1, 10, (28, 28), width=12), (1, 28, 28), 10
    images = torch.randn(batch, *shape)
    labels = torch.randint(0, classes, (batch,))
    if name == "convnet32":  # also exercise channels-last parameters and activations
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    return model, images, labels


CASES = ["convnet", "convnet32", "mlp", "lenet", "odd"]


@pytest.mark.parametrize("conv_call_numel", [1, 10_000])
@pytest.mark.parametrize("name", CASES)
def test_per_example_gradients_match_one_example_at_a_time(
    name: str, conv_call_numel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One example per oneDNN call, or several (e.g. 13 + 7 in the ConvNet's first convolution
    # and 3 * 6 + 2 in its second), covering full and partial groups.
    monkeypatch.setattr(dp_gradient, "_CONV_CALL_NUMEL", conv_call_numel)
    model, images, labels = make_case(name, batch=20)
    params = [p for p in model.parameters() if p.requires_grad]
    samples = per_example_gradients(model, images, labels)
    expected = reference_per_example(model, images, labels)
    assert set(samples) == set(params)
    for param, want in zip(params, expected):
        got = samples[param]
        assert got.shape == (len(labels), *param.shape)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_clipped_sum_is_sum_of_individually_clipped_gradients(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, images, labels = make_case(name, batch=19, seed=1)
    # Chunks of 8 examples: two full chunks and a partial one.
    per_example_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(dp_gradient, "_CHUNK_BYTES", 8 * per_example_bytes)
    assert dp_gradient._chunk_size(list(model.parameters())) == 8
    batch = len(labels)
    expected_per_example = reference_per_example(model, images, labels)
    _, norms = reference_clipped_sum(expected_per_example, 1.0)
    max_grad_norm = norms.median().item()  # about half the examples are clipped
    expected, norms = reference_clipped_sum(expected_per_example, max_grad_norm)
    assert (norms > max_grad_norm).sum() >= batch // 3
    assert (norms < max_grad_norm).sum() >= batch // 3

    result = clipped_gradient_sum(model, images, labels, max_grad_norm)
    torch.testing.assert_close(result.per_example_norms, norms, rtol=1e-4, atol=1e-6)
    assert len(result.grads) == len(expected)
    for got, want in zip(result.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_each_example_contributes_at_most_max_grad_norm() -> None:
    model, images, labels = make_case("convnet", batch=6)
    images = images * 50  # large gradients, all clipped
    max_grad_norm = 0.01
    for i in range(len(labels)):
        result = clipped_gradient_sum(model, images[i : i + 1], labels[i : i + 1], max_grad_norm)
        assert result.per_example_norms.item() > max_grad_norm
        contribution = torch.cat([g.flatten() for g in result.grads]).norm()
        assert contribution <= max_grad_norm * (1 + 1e-5)
        assert contribution >= max_grad_norm * (1 - 1e-4)  # clipped to C, not below


def test_noise_free_private_gradient_is_clipped_mean_over_expected_batch_size() -> None:
    model, images, labels = make_case("convnet", batch=10)
    expected_per_example = reference_per_example(model, images, labels)
    expected, _ = reference_clipped_sum(expected_per_example, 0.5)
    got = private_gradient(
        model, images, labels, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=16, sample_rate=0.5
    )
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want / 16, rtol=1e-4, atol=1e-6)


def test_empty_batch() -> None:
    model, images, labels = make_case("convnet", batch=0)
    params = [p for p in model.parameters() if p.requires_grad]
    result = clipped_gradient_sum(model, images, labels, 1.0)
    assert result.per_example_norms.shape == (0,)
    assert [g.shape for g in result.grads] == [p.shape for p in params]
    assert all((g == 0).all() for g in result.grads)
    noisy = private_gradient(
        model, images, labels, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8, sample_rate=0.5
    )
    assert [g.shape for g in noisy] == [p.shape for p in params]
    assert any((g != 0).any() for g in noisy)


def test_noise_has_std_sigma_c_over_expected_batch_size() -> None:
    model, images, labels = make_case("convnet", batch=0)  # empty batch: the output is pure noise
    sigma, max_grad_norm, expected_batch_size = 1.3, 0.7, 5.0
    generator = torch.Generator().manual_seed(0)

    def draw() -> torch.Tensor:
        grads = private_gradient(
            model,
            images,
            labels,
            max_grad_norm=max_grad_norm,
            noise_multiplier=sigma,
            expected_batch_size=expected_batch_size,
            sample_rate=0.5,
            generator=generator,
        )
        return torch.cat([g.flatten() for g in grads])

    draws = torch.stack([draw() for _ in range(40)])
    want = sigma * max_grad_norm / expected_batch_size
    assert draws.numel() > 50_000  # relative standard error of the std below 0.5%
    assert draws.std().item() == pytest.approx(want, rel=0.02)
    assert abs(draws.mean().item()) < 5 * want / draws.numel() ** 0.5
    # Independent across coordinates and draws: no coordinate is constant across draws.
    assert (draws.std(dim=0) > 0).all()


def test_noise_is_added_around_the_clipped_mean_and_reproducible() -> None:
    model, images, labels = make_case("convnet", batch=4)
    kwargs = {"max_grad_norm": 0.5, "noise_multiplier": 2.0, "expected_batch_size": 4, "sample_rate": 0.5}
    clean = private_gradient(
        model, images, labels, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=4, sample_rate=0.5
    )
    first = private_gradient(model, images, labels, generator=torch.Generator().manual_seed(7), **kwargs)
    again = private_gradient(model, images, labels, generator=torch.Generator().manual_seed(7), **kwargs)
    other = private_gradient(model, images, labels, generator=torch.Generator().manual_seed(8), **kwargs)
    for a, b, c in zip(first, again, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)
    noise = torch.cat([(a - mean).flatten() for a, mean in zip(first, clean)])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.1)


class WithNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = norm
        self.head = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).flatten(1))


def test_batch_norm_really_mixes_examples() -> None:
    # Why the layers below must be rejected: with BatchNorm2d(affine=False) (no parameters, so a
    # check on trainable layers misses it) example 0's output changes when only example 1 changes.
    model = WithNorm(nn.BatchNorm2d(4, affine=False))
    images = torch.randn(3, 1, 28, 28)
    changed = images.clone()
    changed[1] += 5.0
    assert not torch.allclose(model(images)[0], model(changed)[0])


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), nn.InstanceNorm2d(4, track_running_stats=True)],
    ids=["batchnorm", "batchnorm-no-affine", "instancenorm-running-stats"],
)
def test_layers_that_mix_examples_are_rejected(norm: nn.Module) -> None:
    images, labels = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=type(norm).__name__):
        clipped_gradient_sum(WithNorm(norm), images, labels, 1.0)
    with pytest.raises(ValueError, match=type(norm).__name__):
        per_example_gradients(WithNorm(norm), images, labels)


def test_per_example_norms_are_accepted() -> None:
    images, labels = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    for norm in (nn.GroupNorm(4, 4), nn.InstanceNorm2d(4), nn.Identity()):
        assert len(clipped_gradient_sum(WithNorm(norm), images, labels, 1.0).per_example_norms) == 3


def test_frozen_parameters_are_skipped() -> None:
    model, images, labels = make_case("convnet", batch=5)
    first_conv = model.features[0]
    first_conv.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    samples = per_example_gradients(model, images, labels)
    assert first_conv.weight not in samples and first_conv.bias in samples
    result = clipped_gradient_sum(model, images, labels, 1.0)
    assert [g.shape for g in result.grads] == [p.shape for p in params]
    expected, norms = reference_clipped_sum(reference_per_example(model, images, labels), 1.0)
    torch.testing.assert_close(result.per_example_norms, norms, rtol=1e-4, atol=1e-6)
    for got, want in zip(result.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
