"""Layer-wise gradient-matching distance (dataset condensation, as used by PSG)."""

from __future__ import annotations

import torch


def layer_distance(real: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """Sum over output units of ``1 - cos`` between the two gradients of one parameter tensor.

    Vectors (biases, norm scales) are skipped, as the PSG/DC authors do: they carry little
    signal and their cosine is dominated by noise.
    """
    if real.dim() == 1:
        return real.new_zeros(())
    real = real.reshape(real.shape[0], -1)
    synthetic = synthetic.reshape(synthetic.shape[0], -1)
    cosine = (real * synthetic).sum(-1) / (real.norm(dim=-1) * synthetic.norm(dim=-1) + 1e-6)
    return (1 - cosine).sum()


def matching_distance(real_grads: list[torch.Tensor], synthetic_grads: list[torch.Tensor]) -> torch.Tensor:
    """Total layer-wise distance between two gradient lists aligned by parameter."""
    if len(real_grads) != len(synthetic_grads):
        raise ValueError("gradient lists must be aligned parameter by parameter")
    return torch.stack([layer_distance(r, s) for r, s in zip(real_grads, synthetic_grads)]).sum()
