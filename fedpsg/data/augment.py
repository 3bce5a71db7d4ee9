"""Augmentations of dataset condensation, for MNIST-like data.

``crop_scale_rotate`` (evaluation): each image independently gets one of a random shift of up
to ``crop`` pixels, a random per-axis scale in ``[1 - scale, 1 + scale]``, or a rotation of up
to ``rotate`` degrees; all as one batched affine warp.

DSA (differentiable Siamese augmentation; synthesizers): one operation with one parameter draw,
applied alike to a real and a synthetic batch, differentiable in the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedpsg.data.datasets import DatasetSpec


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


# --------------------------------------------------------------------------------------------
# Differentiable Siamese augmentation (DSA, Zhao & Bilen 2021), parameters as NDPDC's / DSA's.
# One operation with one parameter draw is applied to a whole batch (real and synthetic alike).

DSA_OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")
_BRIGHTNESS, _SATURATION, _CONTRAST = 1.0, 2.0, 0.5
_CROP_PAD_RATIO, _CUTOUT_RATIO, _SCALE_RATIO, _ROTATE_DEGREES, _FLIP_PROB = 0.125, 0.5, 1.2, 15.0, 0.5


def dsa_operations(spec: DatasetSpec) -> tuple[str, ...]:
    """NDPDC's DSA strategy: no horizontal flips for digits (MNIST), all operations otherwise."""
    return tuple(op for op in DSA_OPERATIONS if not (op == "flip" and spec.name == "mnist"))


@dataclass(frozen=True)
class SiameseAugmentation:
    """One DSA operation and its parameters; the same transformation for every image it is applied to."""

    operation: str
    values: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        op, v = self.operation, self.values
        if op == "color":
            brightness, saturation, contrast = v
            images = images + (brightness - 0.5) * _BRIGHTNESS
            if images.shape[1] > 1:  # saturation is the identity on grey images
                grey = images.mean(dim=1, keepdim=True)
                images = (images - grey) * (saturation * _SATURATION) + grey
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            return (images - mean) * (contrast + _CONTRAST) + mean
        if op == "crop":  # translate by whole pixels, zero fill
            dx, dy = int(v[0]), int(v[1])
            pad = max(abs(dx), abs(dy))
            if pad == 0:
                return images
            height, width = images.shape[-2:]
            padded = F.pad(images, (pad, pad, pad, pad))
            return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]
        if op == "cutout":  # zero a square of half the image side
            height, width = images.shape[-2:]
            size_y, size_x = int(height * _CUTOUT_RATIO + 0.5), int(width * _CUTOUT_RATIO + 0.5)
            cy, cx = int(v[0]), int(v[1])
            mask = torch.ones(height, width, dtype=images.dtype, device=images.device)
            mask[max(0, cy - size_y // 2) : max(0, cy - size_y // 2 + size_y),
                 max(0, cx - size_x // 2) : max(0, cx - size_x // 2 + size_x)] = 0  # fmt: skip
            return images * mask
        if op == "flip":
            return images.flip(3) if v[0] < _FLIP_PROB else images
        if op in ("scale", "rotate"):
            if op == "scale":
                theta = [[v[0], 0.0, 0.0], [0.0, v[1], 0.0]]
            else:
                cos, sin = math.cos(v[0]), math.sin(v[0])
                theta = [[cos, -sin, 0.0], [sin, cos, 0.0]]
            matrix = torch.tensor(theta, dtype=images.dtype, device=images.device).expand(len(images), 2, 3)
            grid = F.affine_grid(matrix, list(images.shape), align_corners=True)
            return F.grid_sample(images, grid, align_corners=True)
        raise ValueError(f"unknown DSA operation {op!r}; available: {', '.join(DSA_OPERATIONS)}")


def sample_augmentation(
    operations: tuple[str, ...], image_size: tuple[int, int], generator: torch.Generator
) -> SiameseAugmentation:
    """Draw one operation uniformly from ``operations`` and its parameters (public randomness)."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def integer(low: int, high: int) -> int:  # in [low, high)
        return int(torch.randint(low, high, (), generator=generator))

    height, width = image_size
    op = operations[integer(0, len(operations))]
    if op == "color":
        values: tuple[float, ...] = (uniform(0, 1), uniform(0, 1), uniform(0, 1))
    elif op == "crop":
        sx, sy = int(width * _CROP_PAD_RATIO + 0.5), int(height * _CROP_PAD_RATIO + 0.5)
        values = (integer(-sx, sx + 1), integer(-sy, sy + 1))
    elif op == "cutout":
        size_y, size_x = int(height * _CUTOUT_RATIO + 0.5), int(width * _CUTOUT_RATIO + 0.5)
        values = (integer(0, height + 1 - size_y % 2), integer(0, width + 1 - size_x % 2))
    elif op == "flip":
        values = (uniform(0, 1),)
    elif op == "scale":
        values = (uniform(1 / _SCALE_RATIO, _SCALE_RATIO), uniform(1 / _SCALE_RATIO, _SCALE_RATIO))
    elif op == "rotate":
        values = (uniform(-1, 1) * _ROTATE_DEGREES * math.pi / 180,)
    else:
        raise ValueError(f"unknown DSA operation {op!r}; available: {', '.join(DSA_OPERATIONS)}")
    return SiameseAugmentation(op, values)


class AugmentationSampler:
    """The public stream of DSA draws for one generation run: the dataset's operations, and a
    generator seeded from the run's public seed (never the party's secret; augmentation is public)."""

    def __init__(self, spec: DatasetSpec, seed: int) -> None:
        self.operations = dsa_operations(spec)
        self.image_size = spec.image_size
        self._generator = torch.Generator().manual_seed(seed * 100_003 + 99_991)

    def __call__(self) -> SiameseAugmentation:
        """The next draw: one operation and its parameters."""
        return sample_augmentation(self.operations, self.image_size, self._generator)
