"""DP-Merf (Harder et al., AISTATS 2021): a generator fitted to one noisy kernel mean embedding.

A party maps its images (in [0, 1] pixel space) to random Fourier features of a Gaussian
kernel, averages ``phi(x) ⊗ onehot(y)`` over its data, releases that class-conditional mean
embedding once with the Gaussian mechanism, and then trains a conditional generator to match
the noisy embedding. Everything after the release is post-processing: the generator never
sees the real data, so the whole procedure costs exactly the one release.

Defaults follow the DP-Merf baseline of PSG (DingfanChen/Private-Set,
``continual_learning/main_dpmerf.py``), which uses DP-Merf's own kernel widths and
generator (ParkLabML/DP-MERF, ``code_balanced``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fedpsg.data.datasets import dataset_spec, partition_class_indices
from fedpsg.dp.accounting import PrivacyRecord, private_record, validate_budget
from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness, public_seed, secret_generator
from fedpsg.io.progress import Progress
from fedpsg.methods.base import Method, PartyStage, Release, register_method
from fedpsg.nn.evaluation import EvalConfig

EXAMPLE_ADJACENCIES = ("add-remove", "replace-one")  # the neighbourhoods its sensitivity is derived for

__all__ = [
    "DPMERF_KERNEL_WIDTH",
    "DPMerf",
    "ConditionalGenerator",
    "DPMerfConfig",
    "FeatureMap",
    "GeneratorConfig",
    "draw_frequencies",
    "embedding_sensitivity",
    "mean_embedding",
    "random_fourier_features",
    "embedding_privacy",
    "release_embedding",
    "collapsed_classes",
    "fit_and_sample",
    "sample_generator",
    "train_generator",
]

# Gaussian-kernel length scale ell, k(x, y) = exp(-||x - y||^2 / (2 ell^2)), on flattened
# [0, 1] images. DP-Merf draws frequencies as randn / sqrt(rff_sigma) with rff_sigma = 105
# (MNIST) and 127 (FashionMNIST), i.e. rff_sigma is ell^2. Both are close to the median
# pairwise distance of the images (about 10), DP-Merf's heuristic.
DPMERF_KERNEL_WIDTH: dict[str, float] = {"mnist": math.sqrt(105.0), "fmnist": math.sqrt(127.0)}


FeatureMap = Callable[[torch.Tensor], torch.Tensor]  # flattened [0, 1] images (N, H*W) -> features (N, D), norms <= 1


@dataclass(frozen=True)
class GeneratorConfig:
    """The release and the generator of a mean-embedding method (defaults: PSG's DP-Merf baseline)."""

    generator_steps: int = 3000
    batch_size: int = 100  # generated samples per generator step
    lr: float = 0.1  # Adam, as PSG's baseline (lr_img)
    lr_decay: float = 0.9  # StepLR factor ...
    lr_decay_every: int = 600  # ... every this many steps (PSG: 599; DP-Merf: once per epoch)
    latent_dim: int = 5
    hidden_dim: int = 200
    samples_per_class: int = 6000
    accountant: str = "rdp"
    adjacency: str = "add-remove"  # or "replace-one", DP-Merf's own (twice the noise); see embedding_sensitivity
    # Fits of the generator from a new public seed when its samples of a class are all one image
    # (a saturated sigmoid: it happens at lr 0.1). Fitting reads only the release: no privacy cost.
    refits_on_collapse: int = 2

    def __post_init__(self) -> None:
        if min(self.generator_steps, self.batch_size, self.latent_dim, self.hidden_dim, self.lr_decay_every) < 1:
            raise ValueError("generator_steps, batch_size, latent_dim, hidden_dim and lr_decay_every must be >= 1")
        if self.refits_on_collapse < 0:
            raise ValueError(f"refits_on_collapse must be >= 0, got {self.refits_on_collapse}")
        if self.samples_per_class < 0:
            raise ValueError("samples_per_class must be >= 0")
        if self.adjacency not in EXAMPLE_ADJACENCIES:
            raise ValueError(f"adjacency must be one of {EXAMPLE_ADJACENCIES}, got {self.adjacency!r}")


@dataclass(frozen=True)
class DPMerfConfig(GeneratorConfig):
    """Hyper-parameters of DP-Merf: random Fourier features of a Gaussian kernel, and the generator."""

    num_features: int = 1000  # random Fourier features (cos and sin of num_features / 2 frequencies)
    kernel_width: float | None = None  # None: DP-Merf's value for the dataset (DPMERF_KERNEL_WIDTH)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_features < 2 or self.num_features % 2:
            raise ValueError(f"num_features must be even and >= 2 (cos and sin pairs), got {self.num_features}")
        if self.kernel_width is not None and not self.kernel_width > 0:
            raise ValueError(f"kernel_width must be > 0, got {self.kernel_width}")

    def resolved_kernel_width(self, dataset: str) -> float:
        if self.kernel_width is not None:
            return self.kernel_width
        return DPMERF_KERNEL_WIDTH[dataset_spec(dataset).name]


# ---------------------------------------------------------------------------------------------
# Features and the mean embedding
# ---------------------------------------------------------------------------------------------


def draw_frequencies(
    num_features: int, dim: int, kernel_width: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``num_features / 2`` frequencies ``omega ~ N(0, I / kernel_width^2)``, shape ``(num_features // 2, dim)``.

    They are drawn independently of the data, so they cost no privacy.
    """
    if num_features % 2:
        raise ValueError("num_features must be even")
    return torch.randn(num_features // 2, dim, generator=generator) / kernel_width


def random_fourier_features(x_flat: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """``phi(x) = [cos(W x), sin(W x)] / sqrt(D/2)``, shape ``(N, D)``, ``D = 2 * len(frequencies)``.

    ``phi(x) . phi(y)`` estimates the Gaussian kernel without bias, and since
    ``cos^2 + sin^2 = 1``, ``||phi(x)||_2 = 1`` for every ``x``: this is what bounds the
    sensitivity of the mean embedding regardless of the data ("sphere" features of DP-Merf).
    """
    projection = x_flat @ frequencies.t()
    return torch.cat([torch.cos(projection), torch.sin(projection)], dim=1) / math.sqrt(frequencies.shape[0])


def mean_embedding(
    x_flat: torch.Tensor,
    labels: torch.Tensor,
    feature_map: FeatureMap,
    num_classes: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class-conditional mean embedding ``(1/N) sum_i phi(x_i) ⊗ onehot(y_i)``, shape ``(D, num_classes)``.

    ``phi`` is ``feature_map`` (e.g. ``partial(random_fourier_features, frequencies=w)``); ``labels``
    are indices in ``0..num_classes-1``. Column ``c`` is ``(N_c / N)`` times the mean feature of
    class ``c``. Summed in chunks so that ``N x D`` features never coexist in memory.
    """
    if len(x_flat) != len(labels) or len(labels) == 0:
        raise ValueError("need as many labels as inputs, and at least one input")
    total: torch.Tensor | None = None
    for start in range(0, len(labels), chunk_size):
        features = feature_map(x_flat[start : start + chunk_size])
        one_hot = nn.functional.one_hot(labels[start : start + chunk_size], num_classes).to(features.dtype)
        chunk_sum = features.t() @ one_hot  # = sum of the outer products phi(x_i) onehot(y_i)^T
        total = chunk_sum if total is None else total + chunk_sum
    return total / len(labels)


def embedding_sensitivity(n: int, adjacency: str = "add-remove") -> float:
    """L2 sensitivity of :func:`mean_embedding` over ``n`` examples, ``n`` public.

    Each example contributes ``phi(x) ⊗ onehot(y) / n``, of norm exactly ``1 / n``
    (``||phi|| = ||e_y|| = 1``).

    * ``"add-remove"`` (the default, as PSG and DP-SGD): neighbours differ by one example. The
      release is the noisy *sum* divided by the public ``n``, so adding or removing an example
      moves it by one term: sensitivity ``1 / n``.
    * ``"replace-one"`` (DP-Merf's paper): neighbours have the same size and differ in one
      example ``(x, y) -> (x', y')``; the difference ``(phi(x) ⊗ e_y - phi(x') ⊗ e_y') / n``
      reaches ``2 / n`` in norm (``phi(x') = -phi(x)`` is solvable whenever the ``D/2``
      frequencies are linearly independent), so ``2 / n``: twice the noise for the same epsilon.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if adjacency == "add-remove":
        return 1.0 / n
    if adjacency == "replace-one":
        return 2.0 / n
    raise ValueError(f"unknown adjacency {adjacency!r}; available: {', '.join(EXAMPLE_ADJACENCIES)}")


def embedding_privacy(
    n: int, epsilon: float, delta: float, accountant: str = "rdp", adjacency: str = "add-remove"
) -> PrivacyRecord:
    """What one release of the mean embedding of ``n`` examples costs: a single, non-subsampled Gaussian mechanism."""
    validate_budget(epsilon, delta)
    return private_record(epsilon, delta, 1.0, 1, accountant, mechanism="gaussian", adjacency=adjacency, dataset_size=n)


def release_embedding(
    emb: torch.Tensor,
    n: int,
    *,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
    accountant: str = "rdp",
    adjacency: str = "add-remove",
) -> tuple[torch.Tensor, PrivacyRecord]:
    """The Gaussian mechanism on a mean embedding of ``n`` examples: one ``(epsilon, delta)`` release.

    Noise std is ``sigma * embedding_sensitivity(n, adjacency)`` with ``sigma`` calibrated for a
    single, non-subsampled Gaussian mechanism; ``generator`` is the party's secret noise source
    (default: fresh OS entropy).
    ``epsilon = inf`` returns the embedding unchanged.
    """
    record = embedding_privacy(n, epsilon, delta, accountant, adjacency)
    sensitivity = embedding_sensitivity(n, adjacency)
    # Every example is in the one release; its features have norm 1 by construction (no clipping).
    contribution = Contribution(sensitivity, sample_rate=1.0)
    (noisy,) = gaussian_mechanism(
        [emb],
        record.noise_multiplier * sensitivity,
        generator or secret_generator(emb.device),
        contribution=contribution,
    )
    return noisy, record


# ---------------------------------------------------------------------------------------------
# Generator (post-processing of the noisy embedding)
# ---------------------------------------------------------------------------------------------


class ConditionalGenerator(nn.Module):
    """DP-Merf's image generator (``ConvCondGen``): code ⊕ onehot -> FC -> FC -> 2x (upsample, conv) -> sigmoid.

    Two fully connected layers (with batch norm) map the latent code and the one-hot label to
    a ``16 x 7 x 7`` map that two bilinear upsamplings and 5x5 convolutions bring to
    ``1 x 28 x 28``; the sigmoid puts pixels in ``[0, 1]``. Output is flattened ``(B, 784)``.
    """

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        hidden_dim: int = 200,
        channels: tuple[int, int] = (16, 8),
        kernel_size: int = 5,
        image_size: tuple[int, int] = (28, 28),
    ) -> None:
        super().__init__()
        if image_size[0] % 4 or image_size[1] % 4:
            raise ValueError(f"image size must be divisible by 4, got {image_size}")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.start_size = (image_size[0] // 4, image_size[1] // 4)
        start = channels[0] * self.start_size[0] * self.start_size[1]
        self.fc = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, start),
            nn.BatchNorm1d(start),
        )
        pad = (kernel_size - 1) // 2
        self.conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels[0], channels[1], kernel_size, padding=pad),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels[1], 1, kernel_size, padding=pad),
            nn.Sigmoid(),
        )

    def forward(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]``, flattened, for latent ``code (B, latent_dim)`` and class indices ``labels (B,)``."""
        one_hot = nn.functional.one_hot(labels, self.num_classes).to(code.dtype)
        hidden = self.fc(torch.cat([code, one_hot], dim=1))
        hidden = hidden.view(len(code), -1, *self.start_size)
        return self.conv(hidden).flatten(1)


def train_generator(
    noisy_emb: torch.Tensor,
    feature_map: FeatureMap,
    *,
    config: GeneratorConfig,
    image_size: tuple[int, int] = (28, 28),
    device: str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> ConditionalGenerator:
    """Fit a generator whose class-conditional mean embedding matches ``noisy_emb``.

    Takes only the released embedding and the (data-independent) feature map, on ``device``:
    this is pure post-processing of the DP release. Loss: squared L2 distance between
    ``noisy_emb`` and the mean embedding of a batch of generated samples with uniformly drawn
    labels (as DP-Merf).
    """
    num_classes = noisy_emb.shape[1]
    target = noisy_emb.to(device)
    with public_seed(seed, _cuda_indices(device)):  # parameter initialisation uses the global RNG
        gen = ConditionalGenerator(config.latent_dim, num_classes, config.hidden_dim, image_size=image_size)
    gen.to(device).train()
    rng = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.Adam(gen.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
    for _ in range(config.generator_steps):
        labels = torch.randint(num_classes, (config.batch_size,), generator=rng, device=device)
        code = torch.randn(config.batch_size, config.latent_dim, generator=rng, device=device)
        gen_emb = mean_embedding(gen(code, labels), labels, feature_map, num_classes, chunk_size=config.batch_size)
        loss = (target - gen_emb).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.step()
    return gen.eval()


def _cuda_indices(device: str) -> list[int]:
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


@torch.no_grad()
def sample_generator(
    gen: ConditionalGenerator, samples_per_class: int, *, device: str = "cpu", seed: int = 0, chunk_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_class`` flattened ``[0, 1]`` images per class index, grouped by class (on CPU)."""
    gen.eval()  # batch norm with the running statistics of training
    rng = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(gen.num_classes, device=device).repeat_interleave(samples_per_class)
    images = []
    for start in range(0, len(labels), chunk_size):
        chunk = labels[start : start + chunk_size]
        code = torch.randn(len(chunk), gen.latent_dim, generator=rng, device=device)
        images.append(gen(code, chunk).cpu())
    pixels = 16 * gen.start_size[0] * gen.start_size[1]  # (4 h) * (4 w)
    flat = torch.cat(images) if images else torch.empty(0, pixels)
    return flat, labels.cpu()


def collapsed_classes(flat: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """The class indices whose samples (two or more) are all the same image: a collapsed generator."""
    collapsed = []
    for index in labels.unique().tolist():
        samples = flat[labels == index]
        if len(samples) > 1 and bool(((samples - samples[0]).abs() <= 1e-6).all()):
            collapsed.append(int(index))
    return collapsed


REFIT_SEED_STRIDE = 104_729  # public seed of refit k: seed + k * stride


def fit_and_sample(
    noisy_emb: torch.Tensor,
    feature_map: FeatureMap,
    *,
    config: GeneratorConfig,
    class_ids: torch.Tensor,
    image_size: tuple[int, int],
    device: str,
    seed: int,
    progress: Progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`train_generator`, then :func:`sample_generator`; fitted again while a class's samples collapse.

    Every fit and the decision to refit see only the released embedding and public seeds
    (post-processing): a refit repeats no release. ``class_ids`` name the classes in the log.
    """
    for refit in range(config.refits_on_collapse + 1):
        gen = train_generator(
            noisy_emb,
            feature_map,
            config=config,
            image_size=image_size,
            device=device,
            seed=seed + refit * REFIT_SEED_STRIDE,
            progress=progress,
        )
        flat, labels = sample_generator(gen, config.samples_per_class, device=device, seed=seed + 2)
        collapsed = collapsed_classes(flat, labels)
        if not collapsed:
            break
        which = f"every sample of class {', '.join(str(int(class_ids[i])) for i in collapsed)} is one image"
        if refit < config.refits_on_collapse:
            progress.extend(config.generator_steps)
            progress.note(
                f"the generator collapsed ({which}); fitting it again from a new public seed "
                f"({refit + 1} of {config.refits_on_collapse}; no new release, no privacy spent)"
            )
        else:
            progress.note(f"WARNING: the generator collapsed ({which}) in every fit; releasing its samples as they are")
    return flat, labels


# ---------------------------------------------------------------------------------------------
# Whole pipeline
# ---------------------------------------------------------------------------------------------


@register_method
class DPMerf(Method):
    """One DP release of a class-conditional mean embedding, then a generator fitted to it.

    The embedding's features are :meth:`feature_map` (here random Fourier features); a method
    with other features of norm <= 1 overrides only that (DP-MEPF, :mod:`fedpsg.methods.dpmepf`).
    """

    name = "dpmerf"
    label = "DP-Merf"
    releases = "synthetic"
    config_class = DPMerfConfig
    presets = {
        "paper": DPMerfConfig(num_features=1000, generator_steps=3000, batch_size=100, samples_per_class=6000),
        "cpu": DPMerfConfig(num_features=1000, generator_steps=1500, batch_size=100, samples_per_class=300),
        "tiny": DPMerfConfig(num_features=500, generator_steps=200, batch_size=100, samples_per_class=50),
    }
    # Its sets hold thousands of samples per class: fewer replay epochs than a 10-image set needs.
    evaluation = {
        "paper": EvalConfig(width=128, epochs=60, augment=True, num_evals=3),
        "cpu": EvalConfig(width=32, epochs=40, augment=True, num_evals=2),
        "tiny": EvalConfig(width=16, epochs=30, augment=False, num_evals=1),
    }

    def plan(self, stage: PartyStage, config: GeneratorConfig) -> PrivacyRecord:
        return embedding_privacy(len(stage.data), stage.epsilon, stage.delta, config.accountant, config.adjacency)

    def steps(self, stage: PartyStage, config: GeneratorConfig) -> int:
        return config.generator_steps

    def feature_map(self, stage: PartyStage, config: DPMerfConfig) -> FeatureMap:
        """Random Fourier features of DP-Merf's Gaussian kernel; frequencies from the public seed."""
        (height, width) = stage.data.images.shape[2:]
        frequencies = draw_frequencies(
            config.num_features,
            height * width,
            config.resolved_kernel_width(stage.spec.name),
            torch.Generator().manual_seed(stage.seed),
        ).to(stage.device)
        return partial(random_fourier_features, frequencies=frequencies)

    def release(
        self,
        stage: PartyStage,
        config: GeneratorConfig,
        plan: PrivacyRecord,
        secret: SecretRandomness,
        progress: Progress,
    ) -> Release:
        """Release one DP mean embedding of the party's data; generate ``samples_per_class`` images per class.

        The images are normalised like the real data, with the original class ids as labels; the
        record is the single Gaussian release under ``config.adjacency`` (see
        :func:`embedding_sensitivity`). ``stage.seed`` is public (the feature map, generator
        training and sampling: post-processing); the release's noise comes from ``secret``.
        """
        data, spec, device, seed = stage.data, stage.spec, stage.device, stage.seed
        if len(data) == 0:
            raise ValueError(f"{self.label} needs at least one example")
        class_ids, indices = partition_class_indices(data, stage.classes)
        channels, (height, width) = data.images.shape[1], data.images.shape[2:]
        if channels != 1:
            raise ValueError(f"{self.label}'s generator produces single-channel images")
        feature_map = self.feature_map(stage, config)

        # The only access to the real data: features of [0, 1] pixels (where kernels and feature nets are defined).
        pixels = spec.to_pixels(data.images.to(device)).flatten(1)
        with torch.no_grad():
            emb = mean_embedding(pixels, indices.to(device), feature_map, len(class_ids))
        del pixels, indices
        noisy_emb, record = release_embedding(
            emb,
            len(data),
            epsilon=stage.epsilon,
            delta=stage.delta,
            generator=secret.noise,
            accountant=config.accountant,
            adjacency=config.adjacency,
        )
        del emb

        flat, index_labels = fit_and_sample(
            noisy_emb,
            feature_map,
            config=config,
            class_ids=class_ids,
            image_size=(height, width),
            device=device,
            seed=seed,
            progress=progress,
        )
        images = spec.normalise(flat.view(-1, channels, height, width))
        return Release(record, images=images.float(), labels=class_ids[index_labels].long())
