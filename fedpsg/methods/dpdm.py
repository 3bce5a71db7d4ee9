"""DP distribution matching: NDPDC of "Differentially Private Dataset Condensation" (Zheng & Li).

Distribution matching (DM, Zhao & Bilen) learns a small synthetic set S whose mean embedding
under freshly initialised, *untrained* random networks matches that of the real data, class by
class. NDPDC makes the real side differentially private; only forward passes touch the data:

    q = B / min_c N_c                        # one sample rate for every class (see below)
    for it in 1..T:
        psi = embedding of a fresh random ConvNet (its input to the last linear layer)
        a   = one random differentiable augmentation (DSA), public, shared by real and synthetic
        for each class c:
            batch ~ Poisson(q) over the N_c real images of class c          # secret
            mu_c = (sum_i clip_C(psi(a(x_i))) + N(0, sigma^2 C^2 I)) / (q N_c)   # secret noise
            nu_c = mean_j clip_C(psi(a(s_j)))       over the synthetic images of class c
        S <- S - lr * d/dS  sum_c ||mu_c - nu_c||^2                           # SGD, momentum

``clip_C(e) = e * min(1, C / ||e||)``. Random-network embeddings are far longer than NDPDC's
``C = 1``, so in practice every example is *normalised* to norm C; the synthetic embeddings are
scaled the same way (with the scale treated as a constant, as NDPDC does), so both sides are
means of unit-norm features. The augmentation (NDPDC's DSA, "Siamese": one transformation with
one set of parameters for the whole real batch and the synthetic images) is public randomness,
drawn from ``seed``: a fixed transformation of each example does not change its contribution's
norm bound, so it costs nothing.

Accounting. Adding or removing one example changes one class's clipped sum by at most C in L2,
so each (class, iteration) release is a Poisson-subsampled Gaussian mechanism with noise
multiplier sigma. Classes are disjoint, so the releases of different classes in an iteration
compose in parallel: one example takes part in the ``T`` releases of its own class only. The
accountant therefore composes ``T`` steps at one rate q. Every class is sampled at the same
``q = B / min_c N_c`` (the largest of the per-class rates ``B / N_c``; NDPDC samples each class
at ``B / N_c`` and accounts with this maximum too): the smallest class gets ``B`` expected
examples and larger classes more, at no extra privacy cost. Dividing by the *expected* batch
size ``q N_c`` (not the drawn one) keeps the sensitivity at ``C / (q N_c)``; as in Opacus and
PSG the class sizes are treated as public metadata. sigma is calibrated with
:func:`fedpsg.dp.accounting.private_record` so that exactly ``T`` steps at rate q cost the target
(epsilon, delta). Batch membership and noise come from the party's :class:`SecretRandomness`;
every noisy release goes through :func:`fedpsg.dp.mechanisms.gaussian_mechanism`, once per class
and iteration. The public ``seed`` drives only the networks, the augmentation and the
synthetic initialisation (N(0, 1) noise: initialising from real images would leak them).

``epsilon = inf`` is the non-private reference: no noise, and the real mean is over the drawn
batch. The clipping is kept there because it is part of NDPDC's objective (the synthetic side is
normalised in the same way), so the reference isolates the cost of the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedpsg.data.augment import AugmentationSampler, SiameseAugmentation
from fedpsg.data.datasets import DatasetSpec, ImageSet
from fedpsg.dp.accounting import ACCOUNTANTS, PrivacyRecord, private_record
from fedpsg.dp.gradients import check_examples_independent
from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism, poisson_sample
from fedpsg.dp.secret import SecretRandomness, public_seed
from fedpsg.io.progress import Progress
from fedpsg.methods.base import Method, PartyStage, Release, register_method
from fedpsg.nn.evaluation import SMALL_SET_EVALUATION
from fedpsg.nn.models import available_models, build_model

__all__ = [
    "DPDM",
    "DPDMConfig",
    "DPDM_PRESETS",
    "clip_embeddings",
    "embed",
    "poisson_sample",
]


@dataclass(frozen=True)
class DPDMConfig:
    """Hyper-parameters of DP distribution matching (see DPDM_PRESETS for the profiles)."""

    iterations: int = 1000  # T: fresh random networks, one private release per class each
    batch_size: int = 64  # B: expected real batch of the smallest class (Poisson rate B / min_c N_c)
    max_norm: float = 1.0  # C: per-example embedding clip (NDPDC: 1)
    spc: int = 10  # synthetic images per class
    lr_images: float = 100.0  # SGD on the images, loss = sum_c ||mu_c - nu_c||^2 (mean-embedding scale)
    momentum: float = 0.5  # NDPDC / DM
    model: str = "convnet"
    width: int = 32
    depth: int = 3
    augment: bool = False  # DSA (Siamese differentiable augmentation), as NDPDC
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        positive = ["iterations", "batch_size", "spc", "width", "depth"]
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")
        if not (self.max_norm > 0 and self.lr_images > 0):
            raise ValueError(f"max_norm and lr_images must be > 0, got {self.max_norm}, {self.lr_images}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; available: {', '.join(ACCOUNTANTS)}")
        if self.model.lower() not in available_models():
            raise ValueError(f"unknown model {self.model!r}; available: {', '.join(available_models())}")


DPDM_PRESETS: dict[str, DPDMConfig] = {
    # NDPDC's settings (SecMLSys/Differentially-Private-Dataset-Condensation, main_dpdc.py and
    # readme): 10000 iterations, group size 50, C = 1, DSA, ConvNet width 128 / depth 3, image lr 1
    # with momentum 0.5 on ||sum_real + noise - (B / spc) sum_syn||^2, which is B^2 = 2500 times
    # our mean-scale loss, hence lr 2500.
    "paper": DPDMConfig(iterations=10000, batch_size=50, lr_images=2500.0, width=128, augment=True),
    # About 2 minutes of generation for 10 classes on one (shared) core; chosen from the probes in BENCHMARKS.md.
    "cpu": DPDMConfig(lr_images=1000.0, augment=True),
    # Seconds, for tests.
    "tiny": DPDMConfig(iterations=60, batch_size=32, width=16, lr_images=100.0),
}


# --------------------------------------------------------------------------------------------
# Embeddings, clipping, sampling.

# Real images per forward pass. Small chunks keep the activations cache-resident: on CPU a
# 32-image chunk runs the width-32 ConvNet about three times faster per image than 640 at once.
_CHUNK = 32


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The representation a model feeds its last linear layer, ``(N, d)``.

    The ConvNet's (and LeNet's) ``features`` flattened when the classifier is a single linear
    layer (DM's ``embed``); otherwise the input of the model's last ``nn.Linear``.
    """
    if isinstance(getattr(model, "classifier", None), nn.Linear) and hasattr(model, "features"):
        return model.features(images).flatten(1)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return captured[-1].flatten(1)


def clip_embeddings(embeddings: torch.Tensor, max_norm: float, *, detach_scale: bool = True) -> torch.Tensor:
    """Each row scaled by ``min(1, C / ||row||)`` so that its L2 norm is at most ``max_norm``.

    ``detach_scale`` treats the scale as a constant for gradients (NDPDC, synthetic side).
    """
    norms = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True)
    scale = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return embeddings * (scale.detach() if detach_scale else scale)


def _class_sizes(data: ImageSet, classes: list[int]) -> list[int]:
    return [int((data.labels == c).sum()) for c in classes]


def _embedding_dim(net: nn.Module, spec: DatasetSpec) -> int:
    with torch.no_grad():
        return embed(net, torch.zeros(1, spec.channels, *spec.image_size)).shape[1]


def _features(
    net: nn.Module, augment: SiameseAugmentation | None, images: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """Clipped embeddings of (augmented) images; channels-last is oneDNN's fast layout on CPU."""
    images = augment(images) if augment is not None else images
    return clip_embeddings(embed(net, images.contiguous(memory_format=torch.channels_last)), max_norm)


def _fresh_network(config: DPDMConfig, spec: DatasetSpec, seed: int, iteration: int) -> nn.Module:
    with public_seed(seed * 100_003 + iteration):
        net = build_model(config.model, spec.channels, spec.num_classes, spec.image_size, config.width, config.depth)
    return net.requires_grad_(False)


# --------------------------------------------------------------------------------------------


@register_method
class DPDM(Method):
    """DP distribution matching (NDPDC) as a party method: a small DP synthetic set per stage."""

    name = "dpdm"
    label = "DP distribution matching"
    releases = "synthetic"
    config_class = DPDMConfig
    presets = DPDM_PRESETS
    evaluation = SMALL_SET_EVALUATION

    def plan(self, stage: PartyStage, config: DPDMConfig) -> PrivacyRecord:
        """``iterations`` subsampled Gaussian steps at the rate ``min(1, B / min_c N_c)`` shared by all
        classes (parallel composition over the disjoint classes)."""
        classes = stage.classes
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be non-empty and distinct, got {classes}")
        sizes = _class_sizes(stage.data, classes)
        if min(sizes) < 1:
            raise ValueError(f"every class needs at least one private example, got sizes {sizes}")
        return private_record(
            stage.epsilon,
            stage.delta,
            min(1.0, config.batch_size / min(sizes)),
            config.iterations,
            config.accountant,
            max_grad_norm=config.max_norm,
            dataset_size=sum(sizes),
        )

    def steps(self, stage: PartyStage, config: DPDMConfig) -> int:
        return config.iterations

    def release(
        self, stage: PartyStage, config: DPDMConfig, plan: PrivacyRecord, secret: SecretRandomness, progress: Progress
    ) -> Release:
        """Run DP distribution matching on the party's ``stage.data`` (only ``stage.classes``).

        ``stage.seed`` is public (networks, augmentation, synthetic initialisation); ``secret``
        draws the Poisson batches and the noise. ``epsilon = inf`` is the non-private reference
        (no noise). ``progress`` steps once per iteration.
        """
        data, classes, spec, device, seed = stage.data, stage.classes, stage.spec, stage.device, stage.seed
        sizes = _class_sizes(data, classes)
        q = plan.sample_rate
        private = not math.isinf(stage.epsilon)
        std = plan.noise_multiplier * config.max_norm

        per_class = [data.images[data.labels == c].to(device) for c in classes]
        expected = [q * n for n in sizes]  # divisor of the noisy sum: fixed, so sensitivity is C / (q N_c)
        # One example is in one class's sums only, clipped to C there, sampled at q.
        contributions = [
            Contribution(config.max_norm, q, clip=lambda rows: [clip_embeddings(rows[0], config.max_norm)], group=c)
            for c in classes
        ]
        augmentations = AugmentationSampler(spec, seed) if config.augment else None
        first = _fresh_network(config, spec, seed, 0)
        check_examples_independent(first)
        dim = _embedding_dim(first, spec)

        with public_seed(seed):
            syn_images = torch.randn(len(classes) * config.spc, spec.channels, *spec.image_size).to(device)
        syn_images.requires_grad_(True)
        syn_labels = torch.tensor(classes, device=device).repeat_interleave(config.spc)
        optimizer = torch.optim.SGD([syn_images], lr=config.lr_images, momentum=config.momentum)

        for iteration in range(config.iterations):
            net = _fresh_network(config, spec, seed, iteration).to(device, memory_format=torch.channels_last)
            augment = augmentations() if augmentations else None

            # Private side: forward passes only, no gradients. One Gaussian release per class and
            # iteration, whether its Poisson batch is empty or not.
            batches = [images[poisson_sample(len(images), q, secret.sampling).to(device)] for images in per_class]
            with torch.no_grad():
                real = torch.cat(batches)
                chunks = [_features(net, augment, chunk, config.max_norm) for chunk in real.split(_CHUNK)]
                embeddings = torch.cat(chunks) if chunks else real.new_zeros(0, dim)
                sums = [part.sum(dim=0) for part in embeddings.split([len(b) for b in batches])]
                if private:
                    targets = [
                        gaussian_mechanism([total], std, secret.noise, contribution=contributions[k])[0] / expected[k]
                        for k, total in enumerate(sums)
                    ]
                else:
                    targets = [total / len(b) if len(b) else None for total, b in zip(sums, batches)]

            # Synthetic side: post-processing of the released means, one class at a time (a class's
            # images enter only its own term, so the per-class backward passes sum to the gradient).
            optimizer.zero_grad(set_to_none=True)
            for k, target in enumerate(targets):
                if target is None:
                    continue
                own = syn_images[k * config.spc : (k + 1) * config.spc]
                term = (target - _features(net, augment, own, config.max_norm).mean(dim=0)).square().sum()
                term.backward()
            if syn_images.grad is None:  # non-private and every batch empty
                continue
            optimizer.step()
            progress.step()

        return Release(plan, images=syn_images.detach().cpu(), labels=syn_labels.cpu())
