"""DP-GAN-DPAC: GS-WGAN with a dual-purpose auxiliary classifier (the poster in ``shared/reference``).

The poster's idea: add a third player to the private GAN, an auxiliary classifier trained
*sequentially* on real and on generated data, and let the generator learn from it in two ways
that mirror the two utilities of a synthetic set:

* **real2gen (r2g)**: a classifier trained on real images should recognise the generated ones.
  Term: the cross-entropy of the real-trained classifier on each generated sample and its label.
* **gen2real (g2r)**: a classifier trained on generated images should work on real ones. Term:
  a generated sample should teach the classifier what real data teaches it; here, the cosine
  distance between the gradient of the classifier's last layer on the sample and on a real batch
  (the first-order effect of a training step on the sample on the real loss; PSG's matching
  criterion, on one layer).

The poster gives neither networks nor losses nor the privacy mechanism; the choices here, made so
that the method costs *exactly GS-WGAN's privacy* and reuses its mechanism unchanged:

* One classifier per critic, kept by the party beside that critic and trained on that critic's
  data subset only (non-private, like the critic). Each generator step asks one critic and its
  classifier (picked secretly, rate 1/K), and the generator's per-sample loss is

      L_i = -D_k(x_i, y_i) + r2g_weight * CE(A_k(x_i), y_i) + g2r_weight * (1 - cos(g_k^real, g_k(x_i, y_i)))

  whose gradient w.r.t. each sample ``x_i`` is clipped and noised as in GS-WGAN: still one
  Gaussian release per step of B rows, each anywhere in its C-ball whatever subset k holds, so
  GS-WGAN's sensitivity 2 C sqrt(B) and its accounting (T steps at q = 1/K) hold as they are.
  :mod:`fedpsg.methods.gswgan` explains the mechanism; this file adds no release.
* Sequential training: at every critic update the classifier takes a step on a generated batch
  (labels: the conditioning ones), then a step on a real batch of its subset, so that the
  classifier the generator meets has just learnt from real data (r2g's "real-trained").
  ``sequential=False`` is the poster's "w/o sequential" ablation: one step on both losses at once.
  ``g_k^real`` is the last-layer gradient on that real batch after the update.
* The classifier has the critic's trunk (:func:`fedpsg.nn.gan.critic_features`: no
  normalisation, so per-sample gradients stay per sample) with a linear head, Adam with the GAN's
  betas at ``lr_classifier``, and is warm-started with its critic. A critic whose subset is empty
  has an untrained classifier: its steps use -D_k alone. The poster's "w/o init" ablation is not
  modelled.
* ``r2g_weight=0`` / ``g2r_weight=0`` are the poster's "w/o r2g" / "w/o g2r" ablations.

The last layer's per-sample gradient of the cross-entropy is ``(softmax(z) - onehot(y)) h^T`` (and
``softmax(z) - onehot(y)`` for the bias), ``h`` the features: closed form, so the g2r term needs no
per-sample autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.dp.secret import public_seed
from fedpsg.methods.base import register_method
from fedpsg.methods.gswgan import GSWGAN, Critic, GSWGANConfig, GSWGANTrainer
from fedpsg.nn.evaluation import EvalConfig
from fedpsg.nn.gan import ConditionalGenerator, adam, critic_features

__all__ = [
    "DPAC",
    "DPACConfig",
    "AuxiliaryClassifier",
    "ClassifiedCritic",
    "DPACTrainer",
    "classifier_loss_gradients",
    "last_layer_gradients",
]


@dataclass(frozen=True)
class DPACConfig(GSWGANConfig):
    """GS-WGAN's settings plus the auxiliary classifier's (weights 0 and ``sequential=False``: ablations)."""

    r2g_weight: float = 1.0  # cross-entropy of the real-trained classifier on generated samples
    g2r_weight: float = 1.0  # cosine distance of last-layer gradients, generated sample vs real batch
    sequential: bool = True  # a generated step, then a real step (False: one step on both losses)
    lr_classifier: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r2g_weight < 0 or self.g2r_weight < 0:
            raise ValueError("r2g_weight and g2r_weight must be >= 0")
        if not self.lr_classifier > 0:
            raise ValueError(f"lr_classifier must be > 0, got {self.lr_classifier}")


class AuxiliaryClassifier(nn.Module):
    """The critic's trunk and a linear head: features ``h`` and class logits."""

    def __init__(self, num_classes: int, width: int, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.features, dim = critic_features(width, image_size)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``h`` ``(B, dim)`` and logits ``(B, num_classes)``."""
        h = self.features(images)
        return h, self.head(h)


def last_layer_gradients(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient of ``CE(head(h), y)`` w.r.t. the head (weight, then bias), ``(B, C * dim + C)``."""
    error = logits.softmax(dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    weight = error.unsqueeze(2) * features.unsqueeze(1)  # (B, C, dim): d CE / d W = (p - e_y) h^T
    return torch.cat([weight.flatten(1), error], dim=1)


def classifier_loss_gradients(
    classifier: AuxiliaryClassifier,
    real_gradient: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    r2g_weight: float,
    g2r_weight: float,
) -> torch.Tensor:
    """``d/dx_i`` of ``r2g_weight * CE(A(x_i), y_i) + g2r_weight * (1 - cos(real_gradient, g(x_i, y_i)))``.

    Every term is per sample (no batch statistics; ``real_gradient`` is a constant), so the
    gradient of their sum w.r.t. ``x_i`` is sample i's own.
    """
    leaf = images.detach().requires_grad_(True)
    classifier.requires_grad_(False)
    try:
        features, logits = classifier(leaf)
        loss = r2g_weight * F.cross_entropy(logits, labels, reduction="none")
        own = last_layer_gradients(features, logits, labels)
        loss = loss + g2r_weight * (1 - F.cosine_similarity(own, real_gradient.unsqueeze(0), dim=1))
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    finally:
        classifier.requires_grad_(True)
    return grad


@dataclass
class ClassifiedCritic(Critic):
    classifier: AuxiliaryClassifier
    classifier_optimizer: torch.optim.Optimizer
    real_gradient: torch.Tensor | None = None  # mean last-layer gradient on its latest real batch


class DPACTrainer(GSWGANTrainer):
    """GS-WGAN's trainer whose critics each keep an auxiliary classifier (see the module docstring)."""

    config: DPACConfig

    def new_critic(self, index: int, subset: torch.Tensor) -> ClassifiedCritic:
        critic = super().new_critic(index, subset)
        with public_seed(self.seed * 100_003 + 75_011 + index):
            classifier = AuxiliaryClassifier(self.num_classes, self.config.critic_width, self.image_size)
        classifier = classifier.to(self.device)
        optimizer = adam(classifier, self.config.lr_classifier, self.config)
        return ClassifiedCritic(critic.net, critic.optimizer, critic.subset, classifier, optimizer)

    def critic_update(self, critic: ClassifiedCritic, generator: ConditionalGenerator) -> None:
        """The critic's WGAN-GP step, then its classifier's: generated then real (or both at once).

        Like the critic's, the public draws (codes, labels) come first and are always a full batch.
        """
        super().critic_update(critic, generator)
        with torch.no_grad():
            fake, labels = self.generated_batch(generator)
        if len(critic.subset) == 0:
            return
        real, real_labels = self.real_batch(critic)
        classifier, optimizer = critic.classifier, critic.classifier_optimizer

        def loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(classifier(images)[1], targets)

        if self.config.sequential:
            for images, targets in ((fake, labels), (real, real_labels)):
                optimizer.zero_grad(set_to_none=True)
                loss(images, targets).backward()
                optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            (loss(fake, labels) + loss(real, real_labels)).backward()
            optimizer.step()
        with torch.no_grad():
            critic.real_gradient = last_layer_gradients(*classifier(real), real_labels).mean(dim=0)

    def loss_gradients(self, critic: ClassifiedCritic, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """GS-WGAN's ``d(-D(x_i, y_i)) / d x_i`` plus the classifier's terms (once it has seen real data)."""
        grad = super().loss_gradients(critic, images, labels)
        if critic.real_gradient is None:
            return grad
        return grad + classifier_loss_gradients(
            critic.classifier, critic.real_gradient, images, labels,
            r2g_weight=self.config.r2g_weight, g2r_weight=self.config.g2r_weight,
        )  # fmt: skip


@register_method
class DPAC(GSWGAN):
    """DP-GAN-DPAC as a party method: GS-WGAN's mechanism and release, a dual-purpose classifier per critic."""

    name = "dpac"
    label = "DP-GAN-DPAC"
    config_class = DPACConfig
    presets = {profile: DPACConfig(**vars(config)) for profile, config in GSWGAN.presets.items()}
    evaluation: dict[str, EvalConfig] = dict(GSWGAN.evaluation)
    trainer_class = DPACTrainer
