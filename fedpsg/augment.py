"""Dataset-condensation style augmentation for MNIST-like data (crop / scale / rotate).

Each image independently gets one of: a random shift of up to ``crop`` pixels, a random
per-axis scale in ``[1 - scale, 1 + scale]``, or a rotation of up to ``rotate`` degrees;
all as one batched affine warp.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def crop_scale_rotate(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    crop: int = 4,
    scale: float = 0.2,
    rotate: float = 45.0,
) -> torch.Tensor:
    n, _, height, width = images.shape
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) * (high - low) + low

    choice = torch.randint(0, 3, (n,), generator=generator, device=device)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # shift (affine_grid works in [-1, 1] coordinates: one pixel is 2 / size)
    shift_x = torch.randint(-crop, crop + 1, (n,), generator=generator, device=device) * 2.0 / width
    shift_y = torch.randint(-crop, crop + 1, (n,), generator=generator, device=device) * 2.0 / height
    is_crop = choice == 0
    theta[is_crop, 0, 2] = shift_x[is_crop]
    theta[is_crop, 1, 2] = shift_y[is_crop]
    # scale
    is_scale = choice == 1
    theta[is_scale, 0, 0] = 1.0 / uniform(1 - scale, 1 + scale)[is_scale]
    theta[is_scale, 1, 1] = 1.0 / uniform(1 - scale, 1 + scale)[is_scale]
    # rotate
    is_rotate = choice == 2
    angle = uniform(-rotate, rotate) * math.pi / 180.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)
    theta[is_rotate, :, :2] = rot[is_rotate]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # 'border' fills with the edge pixels, i.e. the background of MNIST-like images
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)
