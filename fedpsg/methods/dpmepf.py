"""DP-MEPF (Harder, Jalali Asadabadi, Sutherland & Park, TMLR 2023): DP-Merf with perceptual features.

The kernel of :mod:`fedpsg.methods.dpmerf` is swapped for the features of a *public* network:
the activations of every layer of a network that never saw the party's data, flattened and
concatenated, ``f(x)``. A party releases the class-conditional mean of

* ``phi(x) = f(x) / ||f(x)||`` (the first moment, DP-MEPF's ``phi_1``), or
* ``phi(x) = [f / ||f||, f^2 / ||f^2||] / sqrt(2)`` (first and second moments, ``phi_1`` and ``phi_2``),

once, with the Gaussian mechanism. Normalising every example's features bounds ``||phi(x)|| <= 1``
whatever the data, so the sensitivity is DP-Merf's (1/n add-remove, 2/n replace-one) and the
generator's training afterwards is post-processing. Generator, release and training loop are
DP-Merf's; only :meth:`DPMEPF.feature_map` differs.

The paper's feature network is an ImageNet-trained VGG19 (their MNIST runs: a ResNet18). No
weights can be downloaded here, so the feature network is a setting:

* ``features="public-convnet"`` (default): the evaluation ConvNet trained as a classifier on a
  public dataset that is not the party's (FashionMNIST for MNIST parties, MNIST for FashionMNIST
  ones). Trained once per setting and cached (:func:`feature_cache_dir`) with a JSON record of its
  training beside the weights.
* ``features=<path>``: a torchvision VGG19 checkpoint (``torchvision.models.vgg19().state_dict()``,
  or just its ``features.*`` entries). Images are resized to 32x32, repeated to three channels and
  normalised with ImageNet's statistics, as DP-MEPF feeds (Fashion)MNIST to its encoders.

Differences from the paper (see BENCHMARKS.md): the feature network above; DP-Merf's small
generator and Adam on the plain squared distance (the paper's MNIST runs: a ResNet generator and a
moving average of the synthetic embedding); class-conditional embedding over all ``N`` examples (as
DP-Merf: the class counts stay unreleased, the paper divides by them).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.data.datasets import DatasetSpec, dataset_spec, load_images
from fedpsg.io.files import save_atomically, write_json
from fedpsg.methods.base import PartyStage, register_method
from fedpsg.methods.dpmerf import DPMerf, FeatureMap, GeneratorConfig
from fedpsg.nn.evaluation import EvalConfig, new_classifier, predict, train_classifier

__all__ = [
    "DPMEPF",
    "DPMEPFConfig",
    "MOMENTS",
    "PUBLIC_DATASET",
    "LayerActivations",
    "feature_cache_dir",
    "perceptual_features",
    "public_dataset",
    "public_convnet",
    "vgg19_features",
]

PUBLIC_FEATURES = "public-convnet"
MOMENTS = ("first", "first-and-second")
# The public dataset a party's feature network is trained on: never the party's own.
PUBLIC_DATASET = {"mnist": "fmnist", "fmnist": "mnist"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGG_IMAGE_SIZE = 32
CACHE_ENV = "FEDPSG_CACHE_DIR"  # fedpsg's cache root (default ~/.cache/fedpsg); feature nets go in feature-nets/


@dataclass(frozen=True)
class DPMEPFConfig(GeneratorConfig):
    """Hyper-parameters of DP-MEPF: the public feature network, the moments, and DP-Merf's generator."""

    features: str = PUBLIC_FEATURES  # or the path of a torchvision VGG19 checkpoint
    public_dataset: str | None = None  # None: PUBLIC_DATASET of the party's dataset
    feature_width: int = 32  # the public ConvNet's width ...
    feature_depth: int = 3  # ... depth ...
    feature_epochs: int = 3  # ... and training epochs on the public dataset
    feature_cache: str | None = None  # folder of trained feature nets (None: see feature_cache_dir)
    moments: str = "first"  # or "first-and-second" (DP-MEPF's phi_1, or phi_1 and phi_2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {self.moments!r}")
        if min(self.feature_width, self.feature_depth, self.feature_epochs) < 1:
            raise ValueError("feature_width, feature_depth and feature_epochs must be >= 1")
        # A checkpoint path is checked where it is read: on the party's machine, not the coordinator's.


class LayerActivations(nn.Module):
    """Runs a sequential network and returns the activations of all its ReLUs, flattened and concatenated."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        if not any(isinstance(layer, nn.ReLU) for layer in layers):
            raise ValueError("the feature network has no ReLU layer to take activations from")
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taken = []
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                taken.append(x.flatten(1))
        return torch.cat(taken, dim=1)


def perceptual_features(activations: torch.Tensor, moments: str = "first") -> torch.Tensor:
    """``phi`` of one batch's activations ``(N, D)``: each row normalised so that ``||phi(x)|| <= 1``.

    ``"first"``: ``f / ||f||``. ``"first-and-second"``: ``[f / ||f||, f^2 / ||f^2||] / sqrt(2)``.
    An all-zero row stays zero (norm 0, still within the bound).
    """
    if moments not in MOMENTS:
        raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
    first = F.normalize(activations, dim=1)
    if moments == "first":
        return first
    return torch.cat([first, F.normalize(activations.pow(2), dim=1)], dim=1) / math.sqrt(2.0)


def _frozen(net: nn.Module, device: str) -> nn.Module:
    net = net.to(device).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def feature_cache_dir(config: DPMEPFConfig) -> Path:
    """``config.feature_cache``, else ``$FEDPSG_CACHE_DIR/feature-nets``, else ``~/.cache/fedpsg/feature-nets``."""
    if config.feature_cache:
        return Path(config.feature_cache).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fedpsg") / "feature-nets"


def public_dataset(config: DPMEPFConfig, party_dataset: str) -> DatasetSpec:
    """The feature network's training set: ``config.public_dataset``, else PUBLIC_DATASET; never the party's."""
    party = dataset_spec(party_dataset).name
    public = dataset_spec(config.public_dataset or PUBLIC_DATASET[party])
    if public.name == party:
        raise ValueError(f"the feature network must not be trained on the party's own dataset ({party})")
    return public


def public_convnet(
    config: DPMEPFConfig, party_dataset: str, *, data_dir: str | os.PathLike | None, seed: int = 0
) -> nn.Sequential:
    """The convolutional layers of a ConvNet trained on the public dataset (cached; trained on first use).

    The record beside the weights says what it was trained on, for how long, and its accuracy on
    the public dataset's test split.
    """
    public = public_dataset(config, party_dataset)
    training = EvalConfig(width=config.feature_width, depth=config.feature_depth, epochs=config.feature_epochs,
                          augment=False, num_evals=1, batch_size=128)  # fmt: skip
    cache = feature_cache_dir(config)
    stem = f"convnet-w{training.width}-d{training.depth}-{public.name}-e{training.epochs}-seed{seed}"
    weights = cache / f"{stem}.pt"
    if weights.exists():
        model = new_classifier(public, training)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.features
    started = time.monotonic()
    print(f"DP-MEPF: training the public feature network on {public.name} ({stem}); cached in {cache}", flush=True)
    model = train_classifier(load_images(public.name, train=True, data_dir=data_dir), public, training, seed=seed)
    test = load_images(public.name, train=False, data_dir=data_dir)
    accuracy = (predict(model, test.images) == test.labels).float().mean().item()
    record = {
        "public_dataset": public.name,
        "training": asdict(training),
        "seed": seed,
        "test_accuracy": accuracy,
        "seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    write_json(weights.with_suffix(".json"), record)  # the record first: weights imply their record
    save_atomically(model.state_dict(), weights)
    print(f"DP-MEPF: feature network trained, {public.name} test accuracy {accuracy:.3f}", flush=True)
    return model.features


def vgg19_features(checkpoint: str | os.PathLike) -> nn.Sequential:
    """The convolutional part of a torchvision VGG19 from a checkpoint file (whole model or ``features.*``)."""
    from torchvision.models import vgg19

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DP-MEPF features: {path} is not a file ('{PUBLIC_FEATURES}' or a VGG19 checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    if not features:
        raise ValueError(f"{checkpoint} holds no VGG19 'features.*' weights")
    layers = vgg19().features
    layers.load_state_dict(features)  # strict: a checkpoint of another shape fails here
    return layers


def _vgg_input(pixels: torch.Tensor) -> torch.Tensor:
    """Grey ``[0, 1]`` images ``(N, 1, H, W)`` -> 32x32 RGB normalised with ImageNet's statistics."""
    rgb = F.interpolate(pixels, size=(VGG_IMAGE_SIZE, VGG_IMAGE_SIZE), mode="bilinear", align_corners=False)
    rgb = rgb.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


@register_method
class DPMEPF(DPMerf):
    name = "dpmepf"
    label = "DP-MEPF"
    config_class = DPMEPFConfig
    # Adam at lr 0.01, not DP-Merf's 0.1: on the validation split (MNIST, eps 10, 300 and 1000 steps)
    # 0.01 beat 0.001 and 0.1 diverged (BENCHMARKS.md).
    presets = {
        "paper": DPMEPFConfig(generator_steps=3000, batch_size=100, lr=0.01, samples_per_class=6000),
        "cpu": DPMEPFConfig(generator_steps=1500, batch_size=100, lr=0.01, samples_per_class=300),
        "tiny": DPMEPFConfig(generator_steps=100, batch_size=50, lr=0.01, samples_per_class=50, feature_width=16,
                             feature_epochs=1),
    }  # fmt: skip

    def feature_map(self, stage: PartyStage, config: DPMEPFConfig) -> FeatureMap:
        """``phi`` of flattened ``[0, 1]`` images through the frozen public network (differentiable in the images)."""
        height, width = stage.data.images.shape[2:]
        if config.features == PUBLIC_FEATURES:
            net = public_convnet(config, stage.spec.name, data_dir=stage.data_dir)
            network_input = public_dataset(config, stage.spec.name).normalise
        else:
            net = vgg19_features(config.features)
            network_input = _vgg_input
        activations = LayerActivations(_frozen(net, stage.device))

        def phi(x_flat: torch.Tensor) -> torch.Tensor:
            pixels = x_flat.view(len(x_flat), 1, height, width)
            return perceptual_features(activations(network_input(pixels)), config.moments)

        return phi
