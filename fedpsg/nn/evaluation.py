"""Evaluate a (synthetic) training set: train fresh classifiers on it, test on real images.

The protocol of dataset condensation / PSG: SGD with momentum 0.9 and weight decay 5e-4,
lr decayed x0.1 at half the epochs, crop/scale/rotate augmentation for MNIST-like data,
mean and standard deviation over several freshly initialised models. That is the standard
utility (gen2real); :func:`reversed_utility` is the reverse (real2gen): classifiers trained on real
images label the synthetic set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.data.augment import crop_scale_rotate
from fedpsg.data.datasets import DatasetSpec, ImageSet
from fedpsg.dp.secret import public_seed
from fedpsg.nn.models import build_model


@dataclass(frozen=True)
class EvalConfig:
    model: str = "convnet"
    width: int = 128
    depth: int = 3
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: bool = True
    num_evals: int = 3

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.epochs, self.batch_size, self.num_evals) < 1:
            raise ValueError("width, depth, epochs, batch_size and num_evals must be >= 1")
        if not (self.lr > 0 and self.momentum >= 0 and self.weight_decay >= 0):
            raise ValueError("need lr > 0, momentum >= 0 and weight_decay >= 0")

    @property
    def architecture(self) -> dict:
        """The classifier's shape, as sent to parties that train it."""
        return {"model": self.model, "width": self.width, "depth": self.depth}


# How the coordinator evaluates methods that release a small set (or a model of this shape):
# the paper's protocol (PSG, Section 5.2), and smaller networks and fewer runs off the GPU.
SMALL_SET_EVALUATION = {
    "paper": EvalConfig(width=128, epochs=1000, augment=True, num_evals=3),
    "cpu": EvalConfig(width=32, epochs=300, augment=True, num_evals=2),
    "tiny": EvalConfig(width=16, epochs=300, augment=False, num_evals=2),
}


@dataclass(frozen=True)
class Evaluation:
    """Accuracies (in [0, 1]) of ``num_evals`` classifiers; ``per_group`` has one list per class group."""

    accuracies: list[float]
    per_group: list[list[float]]
    model: nn.Module | None = field(default=None, compare=False, repr=False)  # the first classifier trained

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    @property
    def per_group_mean(self) -> list[float]:
        return [float(np.mean(group)) for group in self.per_group]


def new_classifier(spec: DatasetSpec, config: EvalConfig, seed: int = 0) -> nn.Module:
    """A freshly initialised classifier of the evaluation architecture (seeded, no global side effects)."""
    with public_seed(seed):
        return build_model(
            config.model, spec.channels, spec.num_classes, spec.image_size, width=config.width, depth=config.depth
        )


def train_classifier(
    train: ImageSet,
    spec: DatasetSpec,
    config: EvalConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    model: nn.Module | None = None,
) -> nn.Module:
    """Train a classifier (``spec.num_classes`` outputs) on ``train``: ``model`` if given, else a fresh one."""
    if model is None:
        model = new_classifier(spec, config, seed)
    model = model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    images, labels = train.images.to(device), train.labels.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[config.epochs // 2], gamma=0.1)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator, device=device)
        for start in range(0, len(labels), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = images[batch]
            if config.augment:
                x = crop_scale_rotate(x, generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 1024
) -> torch.Tensor:
    model.eval()
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


def accuracy_by_group(
    model: nn.Module, test: ImageSet, groups: list[list[int]], device: str | torch.device = "cpu"
) -> tuple[float, list[float]]:
    """Accuracy on all of ``test`` and on the test images of each class group."""
    predictions = predict(model, test.images, device)
    correct = predictions == test.labels
    per_group = []
    for group in groups:
        mask = torch.isin(test.labels, torch.as_tensor(group, dtype=test.labels.dtype))
        per_group.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
    return float(correct.float().mean()), per_group


def evaluate_training_set(
    train: ImageSet,
    test: ImageSet,
    spec: DatasetSpec,
    config: EvalConfig,
    groups: list[list[int]] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Evaluation:
    """Train ``config.num_evals`` fresh classifiers on ``train``; test each on ``test``."""
    groups = groups or []
    accuracies, per_group, first = [], [[] for _ in groups], None
    for run in range(config.num_evals):
        model = train_classifier(train, spec, config, device, seed=seed + run)
        overall, by_group = accuracy_by_group(model, test, groups, device)
        accuracies.append(overall)
        for slot, value in zip(per_group, by_group):
            slot.append(value)
        first = first or model
    return Evaluation(accuracies, per_group, first)


# real2gen's judges, classifiers trained on real images: thousands of real images need far fewer
# passes than a set of ten images per class (300-1000 epochs).
REAL_CLASSIFIERS = {
    "paper": EvalConfig(width=128, epochs=10, augment=True, num_evals=3),
    "cpu": EvalConfig(width=32, epochs=10, augment=True, num_evals=2),
    "tiny": EvalConfig(width=16, epochs=2, augment=False, num_evals=1),
}


def real_classifiers(
    real: ImageSet, spec: DatasetSpec, config: EvalConfig, device: str | torch.device = "cpu", seed: int = 0
) -> list[nn.Module]:
    """``config.num_evals`` classifiers trained on ``real`` (e.g. ``REAL_CLASSIFIERS[profile]``): the
    judges of :func:`reversed_utility`. ``real`` must be the evaluator's own images (the validation
    split), never a party's."""
    return [train_classifier(real, spec, config, device, seed=seed + run) for run in range(config.num_evals)]


def reversed_utility(
    synthetic: ImageSet, classifiers: list[nn.Module], device: str | torch.device = "cpu"
) -> Evaluation:
    """real2gen (reversed utility, DP-GAN-DPAC's poster): the accuracy of classifiers trained on real
    images (:func:`real_classifiers`) on the synthetic set: whether its images carry their labels'
    features as real data shows them."""
    return Evaluation([accuracy_by_group(model, synthetic, [], device)[0] for model in classifiers], [])
