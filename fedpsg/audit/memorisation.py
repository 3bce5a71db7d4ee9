"""Memorisation report: are released images closer to the party's training images than to unseen ones?

For each released image of class c we measure the Euclidean distance (pixels, flattened) to its
nearest image in a pool of the party's *training* images of class c, and to its nearest image in
an equally large pool of held-out *test* images of class c. The pools have equal size because the
nearest-neighbour distance shrinks as a pool grows. A release that does not depend on particular
training examples is, in distribution, as close to either pool, so:

* ``share_closer_to_train`` is about 0.5 and the median of ``d_train / d_test`` about 1;
* a release that copies training images has a share above 0.5 and ratios below 1.

A copy of a training image outside the (sampled) training pool is invisible to those two, so
``near_copies`` looks at *all* of the class's training images: it counts released images closer to
some training image than 99% of the held-out images of the class are (the 1% quantile of the
test-to-all-training distance). A held-out image is by construction no copy, so a release below
that line looks like one. The pictures show each released image over its nearest training image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

from fedpsg.data.datasets import DatasetSpec, ImageSet
from fedpsg.data.synthetic import to_pixels

NEAR_COPY_QUANTILE = 0.01


@dataclass(frozen=True)
class Memorisation:
    """Per released image: its class, nearest distances to both pools, and its nearest training image."""

    labels: torch.Tensor  # (M,)
    train_distance: torch.Tensor  # (M,) to the training pool
    test_distance: torch.Tensor  # (M,) to the equally large test pool
    copy_distance: torch.Tensor  # (M,) to all training images of the class
    nearest_train: torch.Tensor  # (M, C, H, W): the training image nearest to each released image
    near_copy_threshold: dict[int, float]  # class -> 1% quantile of test-to-all-training distances
    pool_size: dict[int, int]  # class -> images in each of the two pools

    @property
    def ratio(self) -> torch.Tensor:
        return self.train_distance / self.test_distance.clamp_min(1e-12)

    @property
    def near_copy(self) -> torch.Tensor:
        thresholds = torch.tensor([self.near_copy_threshold[int(c)] for c in self.labels])
        return self.copy_distance < thresholds

    def summary(self) -> dict:
        return {
            "released": len(self.labels),
            "share_closer_to_train": float((self.train_distance < self.test_distance).float().mean()),
            "median_ratio": float(self.ratio.median()),
            "near_copies": int(self.near_copy.sum()),
            "median_copy_distance": float(self.copy_distance.median()),
            "median_test_distance": float(self.test_distance.median()),
            "pool_size": {str(c): n for c, n in self.pool_size.items()},
        }


def _flat_pixels(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    return to_pixels(images, spec).flatten(1)


def measure_memorisation(
    released: ImageSet, train: ImageSet, test: ImageSet, spec: DatasetSpec, seed: int = 0
) -> Memorisation:
    """Distances of each released image to equal-size training and test pools of its class.

    ``train`` is the party's private data, ``test`` held-out images (both may hold other classes;
    only the released classes are used). The pools are drawn with the public ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = released.labels.cpu()
    train_distance = torch.empty(len(labels))
    test_distance = torch.empty(len(labels))
    copy_distance = torch.empty(len(labels))
    nearest = torch.empty_like(released.images.cpu())
    thresholds: dict[int, float] = {}
    pool_sizes: dict[int, int] = {}
    for cls in labels.unique().tolist():
        train_all = train.images[train.labels == cls]
        test_all = test.images[test.labels == cls]
        size = min(len(train_all), len(test_all))
        if size < 2:
            raise ValueError(f"class {cls}: need at least 2 training and 2 test images, got {size}")
        train_pool = torch.randperm(len(train_all), generator=generator)[:size]
        test_pool = torch.randperm(len(test_all), generator=generator)[:size]
        train_flat, test_flat = _flat_pixels(train_all, spec), _flat_pixels(test_all[test_pool], spec)

        mask = labels == cls
        released_flat = _flat_pixels(released.images[mask], spec)
        to_train = torch.cdist(released_flat, train_flat)
        train_distance[mask] = to_train[:, train_pool].min(1).values
        test_distance[mask] = torch.cdist(released_flat, test_flat).min(1).values
        nearest_copy = to_train.min(1)
        copy_distance[mask] = nearest_copy.values
        nearest[mask] = train_all[nearest_copy.indices]

        test_to_train = torch.cdist(test_flat, train_flat).min(1).values
        thresholds[cls] = float(torch.quantile(test_to_train, NEAR_COPY_QUANTILE))
        pool_sizes[cls] = size
    return Memorisation(labels, train_distance, test_distance, copy_distance, nearest, thresholds, pool_sizes)


def save_nearest_pairs(
    released: ImageSet, memorisation: Memorisation, spec: DatasetSpec, path: str | Path, pairs: int = 16
) -> None:
    """The ``pairs`` released images closest to a training image: released on top, training below."""
    order = memorisation.copy_distance.argsort()[:pairs]
    top = to_pixels(released.images[order], spec)
    bottom = to_pixels(memorisation.nearest_train[order], spec)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([top, bottom]), str(path), nrow=len(order), padding=2, pad_value=1.0)
