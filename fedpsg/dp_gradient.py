"""The DP real-data gradient of PSG: per-example gradients, clipped to C, summed, noised.

Per-example gradients come from Opacus's per-layer grad samplers (the same functions its
GradSampleModule uses), but driven differently: forward hooks keep each layer's input and
output, and a single ``autograd.grad`` to the layer *outputs* gives the per-example
backprops without ever computing the (unused) batch weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.nn import functional as F


@dataclass
class ClippedGradientSum:
    """Sum over the batch of per-example gradients clipped to ``max_grad_norm``."""

    grads: list[torch.Tensor]  # aligned with model.parameters()
    per_example_norms: torch.Tensor  # norms before clipping, shape (batch,)


def _layers_with_parameters(model: nn.Module) -> list[nn.Module]:
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    unsupported = [type(m).__name__ for m in layers if type(m) not in GradSampleModule.GRAD_SAMPLERS]
    if unsupported:
        raise TypeError(f"no per-example gradient rule for layer types: {sorted(set(unsupported))}")
    return layers


def per_example_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient of each example's cross-entropy loss, keyed by parameter, shape ``(B, *param.shape)``."""
    layers = _layers_with_parameters(model)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        loss = F.cross_entropy(model(images), labels, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    backprops = torch.autograd.grad(loss, outputs)
    samples: dict[nn.Parameter, torch.Tensor] = {}
    for layer, activation, backprop in zip(layers, inputs, backprops):
        samples.update(GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [activation], backprop))
    return samples


def clipped_gradient_sum(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> ClippedGradientSum:
    """Per-example gradients scaled by ``min(1, C / ||g_i||)`` and summed over the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(labels) == 0:  # Poisson sampling can draw an empty batch
        return ClippedGradientSum([torch.zeros_like(p) for p in params], images.new_zeros(0))
    samples = per_example_gradients(model, images, labels)
    squared = torch.zeros(len(labels), device=images.device, dtype=images.dtype)
    for grad in samples.values():
        squared += grad.reshape(len(labels), -1).pow(2).sum(dim=1)
    norms = squared.sqrt()
    scale = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
    grads = [torch.einsum("b,b...->...", scale, samples[p]) for p in params]
    return ClippedGradientSum(grads, norms)


def private_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The Gaussian mechanism on the clipped sum: ``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B``.

    Dividing by the *expected* batch size (not the drawn one) keeps the sensitivity at C/B
    under Poisson sampling, as in Opacus.
    """
    clipped = clipped_gradient_sum(model, images, labels, max_grad_norm)
    std = noise_multiplier * max_grad_norm
    noisy = []
    for grad in clipped.grads:
        if std > 0:
            noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
            grad = grad + std * noise
        noisy.append(grad / expected_batch_size)
    return noisy
