"""Classifier architectures used for gradient matching and evaluation.

The default is the ConvNet of dataset condensation / PSG: ``depth`` blocks of
conv 3x3 -> instance norm (affine) -> ReLU -> 2x2 average pooling, then a linear layer.
New architectures register themselves with :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelFactory = Callable[..., nn.Module]
INITIALISATIONS = ("kaiming", "torch")  # Kaiming-uniform (ReLU gain, zero bias), or PyTorch's layer defaults
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that makes an architecture available to :func:`build_model` under ``name``."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        _MODELS[name.lower()] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    width: int = 128,
    depth: int = 3,
    init: str = "kaiming",
) -> nn.Module:
    """Build a freshly initialised model by registry name (``init``: one of INITIALISATIONS)."""
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    model = _MODELS[key](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width, depth=depth
    )
    if init not in INITIALISATIONS:
        raise ValueError(f"unknown init {init!r}; available: {', '.join(INITIALISATIONS)}")
    if init == "kaiming":
        model.apply(_kaiming_init)
    return model


def _kaiming_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model("convnet")
class ConvNet(nn.Module):
    """The PSG / dataset-condensation ConvNet with instance normalisation."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128, depth: int = 3
    ) -> None:
        super().__init__()
        height, width_px = image_size
        # As in dataset condensation, 28x28 grey images are padded to 32x32 by the first conv so
        # that three poolings give an integer 4x4 map.
        pad_first = 3 if (in_channels == 1 and height == 28) else 1
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(depth):
            padding = pad_first if block == 0 else 1
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=padding),
                nn.GroupNorm(width, width, affine=True),  # instance norm with affine parameters
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            if block == 0:
                height, width_px = height + 2 * padding - 2, width_px + 2 * padding - 2
            height, width_px = height // 2, width_px // 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * height * width_px, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("mlp")
class MLP(nn.Module):
    """Three-layer perceptron (the paper's MLP evaluation model); ``width`` is the hidden size."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128, depth: int = 3
    ) -> None:
        super().__init__()
        features = in_channels * image_size[0] * image_size[1]
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("lenet")
class LeNet(nn.Module):
    """LeNet-5 style network (two conv layers, three linear layers)."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128, depth: int = 3
    ) -> None:
        super().__init__()
        pad = 2 if image_size[0] == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
