"""The DP real-data gradient of PSG: per-example gradients, clipped to C, summed, noised.

Per-example gradients are computed layer by layer from each layer's input (kept by a forward
hook) and the gradient of the loss with respect to its output (one ``autograd.grad`` to the
layer outputs, which never computes the unused batch weight gradients). Layers without a fast
rule below use Opacus's per-layer grad samplers, the same functions its GradSampleModule uses.

Speed on CPU (see BENCHMARKS.md): the convolution rule calls oneDNN's weight-gradient kernel
once per example instead of Opacus's ``unfold`` + ``bmm``; on this project's CPUs oneDNN runs
that contraction at roughly twice the speed of MKL's batched matmul and needs no im2col buffer,
so per-example weight gradients cost about what the ordinary batch weight gradient costs.
Everything stays fp32, so the clip below bounds each example's contribution by C exactly as
computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from fedpsg.dp.mechanisms import Contribution, clip_factors, gaussian_mechanism
from fedpsg.dp.secret import secret_generator

GradSampler = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[nn.Parameter, torch.Tensor]]


@dataclass
class ClippedGradientSum:
    """Sum over the batch of per-example gradients clipped to ``max_grad_norm``."""

    grads: list[torch.Tensor]  # aligned with [p for p in model.parameters() if p.requires_grad]
    per_example_norms: torch.Tensor  # norms before clipping, shape (batch,)


# Input elements per oneDNN call in the convolution rule. Single small examples run at a
# fraction of oneDNN's speed (per-call overhead, and PyTorch routes tiny single-example
# inputs to its slow im2col path), so small examples are grouped; but a grouped call is
# slower per FLOP, so large ones are not. Measured on 2-core Zen4 at widths 32-128.
_CONV_CALL_NUMEL = 65536


def _conv2d_grad_sample(layer: nn.Conv2d, activation: torch.Tensor, backprop: torch.Tensor) -> dict:
    """Per-example Conv2d gradients from oneDNN's weight-gradient kernel, never ``unfold``.

    ``k`` consecutive examples go into one call as a grouped convolution (examples stacked along
    channels, ``groups = k * layer.groups``), whose weight gradient is exactly the ``k``
    per-example gradients stacked. The kernel is the layer's own backward, so any stride,
    padding, dilation and groups work.
    """
    samples = {}
    weight, bias = layer.weight, layer.bias
    if weight.requires_grad:
        padding = layer.padding
        if layer.padding_mode != "zeros" or isinstance(padding, str):
            # Pad explicitly as Conv2d's forward does ("same", reflect, ...). Opacus's rule
            # always zero-pads, which is wrong for the other padding modes.
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            activation = F.pad(activation, layer._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        batch = len(backprop)
        k = max(1, min(batch, -(-_CONV_CALL_NUMEL // activation[0].numel())))
        # Only the weight's shape matters: output_mask asks for the weight gradient alone.
        stacked_weight = weight.detach().repeat(k, 1, 1, 1)
        pieces = []
        for start in range(0, batch, k):
            n = min(k, batch - start)
            grad = torch.ops.aten.convolution_backward(
                backprop[start : start + n].reshape(1, -1, *backprop.shape[2:]),
                activation[start : start + n].reshape(1, -1, *activation.shape[2:]),
                stacked_weight[: n * len(weight)],
                None,
                layer.stride,
                padding,
                layer.dilation,
                False,
                [0, 0],
                n * layer.groups,
                [False, True, False],
            )[1]
            pieces.append(grad.reshape(n, *weight.shape))  # a view unless oneDNN chose channels-last
        samples[weight] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if bias is not None and bias.requires_grad:
        samples[bias] = backprop.sum(dim=(2, 3))
    return samples


def _group_norm_grad_sample(layer: nn.GroupNorm, activation: torch.Tensor, backprop: torch.Tensor) -> dict:
    """Per-example GroupNorm gradients: ``sum_hw(dy * x_hat)`` and ``sum_hw(dy)``.

    Same maths as Opacus's rule, but the contraction is one fused einsum instead of
    materialising ``x_hat * dy``.
    """
    samples = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.group_norm(activation, layer.num_groups, eps=layer.eps)
        samples[layer.weight] = torch.einsum("nc...,nc...->nc", normalised, backprop)
    if layer.bias is not None and layer.bias.requires_grad:
        samples[layer.bias] = backprop.flatten(2).sum(dim=2)
    return samples


def _fast_rule(layer: nn.Module) -> GradSampler | None:
    if type(layer) is nn.Conv2d:
        return _conv2d_grad_sample
    if type(layer) is nn.GroupNorm and layer.affine:
        return _group_norm_grad_sample
    return None


def _grad_sampler(layer: nn.Module) -> GradSampler:
    fast = _fast_rule(layer)
    if fast is not None:
        return fast
    opacus_rule = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    return lambda module, activation, backprop: opacus_rule(module, [activation], backprop)


def check_examples_independent(model: nn.Module) -> None:
    """Reject models in which one example's output depends on other examples of the batch.

    Per-example clipping bounds one example's influence only if nothing else in the batch sees
    it. Batch norm mixes the batch (with or without affine parameters, and its running
    statistics carry private data from step to step); Opacus's validators know these and
    other offenders, but run only on trainable modules, so they are applied here to every module.
    """
    batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    problems = [f"{type(m).__name__}: mixes the examples of a batch" for m in batch_norms]
    for module in model.modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None and not isinstance(module, _BatchNorm):
            problems.extend(f"{type(module).__name__}: {error}" for error in validator(module))
    if problems:
        raise ValueError("model unfit for per-example DP gradients: " + "; ".join(problems))


def _layers_with_parameters(model: nn.Module) -> list[nn.Module]:
    check_examples_independent(model)
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    unsupported = [type(m).__name__ for m in layers if type(m) not in GradSampleModule.GRAD_SAMPLERS]
    if unsupported:
        raise TypeError(f"no per-example gradient rule for layer types: {sorted(set(unsupported))}")
    return layers


Capture = list[tuple[nn.Module, torch.Tensor, torch.Tensor]]  # (layer, input, d loss / d output) per call


def _capture(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Capture:
    """One forward and one backward to the outputs of the layers with trainable parameters."""
    layers = _layers_with_parameters(model)
    calls = []

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls.append((module, args[0].detach(), output))

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        loss = F.cross_entropy(model(images), labels, reduction="sum")
    finally:
        for handle in handles:
            handle.remove()
    backprops = torch.autograd.grad(loss, [output for _, _, output in calls])
    return [(layer, activation, backprop) for (layer, activation, _), backprop in zip(calls, backprops)]


def _grad_samples(capture: Capture, rows: slice) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of the examples in ``rows``."""
    samples: dict[nn.Parameter, torch.Tensor] = {}
    for layer, activation, backprop in capture:
        for param, sample in _grad_sampler(layer)(layer, activation[rows], backprop[rows]).items():
            # A layer called more than once (shared weights) contributes the sum of its calls.
            samples[param] = samples[param] + sample if param in samples else sample
    return samples


def per_example_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient of each example's cross-entropy loss, keyed by parameter, shape ``(B, *param.shape)``."""
    return _grad_samples(_capture(model, images, labels), slice(None))


def _per_example_norms(samples: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's gradient over all parameters jointly, in fp32."""
    per_param = [torch.linalg.vector_norm(s.flatten(1), dim=1, dtype=torch.float32) for s in samples]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1)


# Memory for the per-example gradients that exist at once in clipped_gradient_sum. Clipping
# needs all of an example's gradients but nothing from other examples, so working chunk by
# chunk keeps them cache-resident (1.3 MB per example at width 128) instead of materialising
# B copies of the model, whose page faults and memory traffic cost more than the clipping.
_CHUNK_BYTES = 24 << 20


def _chunk_size(params: list[nn.Parameter]) -> int:
    """Examples per chunk: a power of two within _CHUNK_BYTES (so it divides the conv groups)."""
    per_example = sum(p.numel() * p.element_size() for p in params)
    fit = max(1, _CHUNK_BYTES // max(per_example, 1))
    return 1 << (fit.bit_length() - 1)


def clipped_gradient_sum(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> ClippedGradientSum:
    """Per-example gradients scaled by ``min(1, C / ||g_i||)`` and summed over the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in params]  # contiguous, for addmv_
    if len(labels) == 0:  # Poisson sampling can draw an empty batch
        return ClippedGradientSum(sums, images.new_zeros(0))
    capture = _capture(model, images, labels)
    norms = []
    chunk = _chunk_size(params)
    for start in range(0, len(labels), chunk):
        samples = _grad_samples(capture, slice(start, start + chunk))
        used = [(total, samples[p].flatten(1)) for total, p in zip(sums, params) if p in samples]
        chunk_norms = _per_example_norms([sample for _, sample in used])
        scale = clip_factors(chunk_norms, max_grad_norm)
        for total, sample in used:
            # The weighted sum over examples is a matrix-vector product.
            total.view(-1).addmv_(sample.T, scale.to(sample.dtype))
        norms.append(chunk_norms)
    return ClippedGradientSum(sums, torch.cat(norms))


def private_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    sample_rate: float,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The Gaussian mechanism on the clipped sum: ``(sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / B``.

    ``sample_rate``: the Poisson rate at which the batch was drawn (what the accountant assumed).

    One release (one call of :func:`fedpsg.dp.mechanisms.gaussian_mechanism`) per call. ``generator``
    is the party's secret noise source (default: fresh OS entropy). Dividing by the *expected* batch size (not the drawn
    one) keeps the sensitivity at C/B under Poisson sampling, as in Opacus.
    """
    clipped = clipped_gradient_sum(model, images, labels, max_grad_norm)
    std = noise_multiplier * max_grad_norm
    contribution = Contribution.clipped_jointly(max_grad_norm, sample_rate)
    noisy = gaussian_mechanism(
        clipped.grads, std, generator or secret_generator(clipped.grads[0].device), contribution=contribution
    )
    return [grad / expected_batch_size for grad in noisy]
