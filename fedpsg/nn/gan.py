"""The conditional GAN shared by GS-WGAN (a party method) and its federated form.

Images live in ``[0, 1]`` pixel space, ``(B, 1, H, W)``. Nothing here is private by itself:
the networks, the WGAN-GP critic update and the generator's per-sample loss gradients are the
pieces whose use :mod:`fedpsg.methods.gswgan` and :mod:`fedpsg.federated_gan` sanitise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.dp.accounting import ACCOUNTANTS
from fedpsg.dp.secret import public_seed


@dataclass(frozen=True)
class GANConfig:
    """What both GAN trainings share (defaults: GS-WGAN's paper and code, ``source/config.py``)."""

    pretrain_iterations: int = 2000  # non-private warm-start GAN iterations of a critic on its own data
    critic_iterations: int = 5  # critic updates per (warm-start or private) generator iteration
    batch_size: int = 32  # B: real images per critic update, generated samples per generator step
    max_grad_norm: float = 1.0  # C: per-sample clip of the gradient w.r.t. each generated image
    gp_weight: float = 10.0  # lambda of the WGAN-GP gradient penalty
    drift_weight: float = 0.001  # penalty on the critic's squared real scores (the code's L_epsilon)
    lr_generator: float = 1e-4
    lr_discriminator: float = 1e-4
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    latent_dim: int = 10
    generator_width: int = 64
    critic_width: int = 64
    ema_decay: float = 0.999  # sample from an exponential moving average of the generator (0: the last one)
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        positive = ["critic_iterations", "batch_size", "latent_dim", "generator_width", "critic_width"]
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")
        if self.pretrain_iterations < 0:
            raise ValueError(f"pretrain_iterations must be >= 0, got {self.pretrain_iterations}")
        if not (self.max_grad_norm > 0 and self.lr_generator > 0 and self.lr_discriminator > 0):
            raise ValueError("max_grad_norm, lr_generator and lr_discriminator must be > 0")
        if self.gp_weight < 0 or self.drift_weight < 0:
            raise ValueError("gp_weight and drift_weight must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and 0 <= self.ema_decay < 1):
            raise ValueError("adam_beta1, adam_beta2 and ema_decay must be in [0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; available: {', '.join(ACCOUNTANTS)}")


def _pixel_norm(h: torch.Tensor) -> torch.Tensor:
    """Each position's feature vector scaled to unit mean square: per sample, unlike batch norm."""
    return h * torch.rsqrt(h.square().mean(dim=1, keepdim=True) + 1e-8)


class ConditionalGenerator(nn.Module):
    """code ⊕ onehot -> linear -> (2w, H/4, W/4) -> two stride-2 transposed convs -> sigmoid.

    Pixel norm after each hidden layer keeps activations in scale without mixing the batch, so
    training and sampling behave the same.
    """

    def __init__(self, latent_dim: int, num_classes: int, width: int = 64, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        if image_size[0] % 4 or image_size[1] % 4:
            raise ValueError(f"image size must be divisible by 4, got {image_size}")
        self.latent_dim, self.num_classes, self.width = latent_dim, num_classes, width
        self.start_size = (image_size[0] // 4, image_size[1] // 4)
        self.fc = nn.Linear(latent_dim + num_classes, 2 * width * self.start_size[0] * self.start_size[1])
        self.up1 = nn.ConvTranspose2d(2 * width, width, kernel_size=4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(width, 1, kernel_size=4, stride=2, padding=1)

    def forward(self, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]``, ``(B, 1, H, W)``, for codes ``(B, latent_dim)`` and class indices ``(B,)``."""
        one_hot = F.one_hot(labels, self.num_classes).to(code.dtype)
        h = F.relu(self.fc(torch.cat([code, one_hot], dim=1)))
        h = _pixel_norm(h.view(len(code), 2 * self.width, *self.start_size))
        h = _pixel_norm(F.relu(self.up1(h)))
        return torch.sigmoid(self.up2(h))


def critic_features(width: int, image_size: tuple[int, int]) -> tuple[nn.Sequential, int]:
    """The critic's trunk, three 5x5 stride-2 convs with LeakyReLU, flattened, and its output size.

    No normalisation: each sample's output depends on that sample only.
    """
    features = nn.Sequential(
        nn.Conv2d(1, width, kernel_size=5, stride=2, padding=2),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, kernel_size=5, stride=2, padding=2),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, kernel_size=5, stride=2, padding=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
    )
    with torch.no_grad():
        dim = features(torch.zeros(1, 1, *image_size)).shape[1]
    return features, dim


class ConditionalCritic(nn.Module):
    """Three 5x5 stride-2 convs and a projection head: ``D(x, y) = w . h(x) + e_y . h(x)``.

    No batch norm: the gradient penalty and the per-sample gradients need each sample's score
    to depend on that sample only.
    """

    def __init__(self, num_classes: int, width: int = 64, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.features, dim = critic_features(width, image_size)
        self.linear = nn.Linear(dim, 1)
        self.embed = nn.Embedding(num_classes, dim)
        nn.init.normal_(self.embed.weight, std=0.01)  # the class term starts small next to w . h

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One score per image, ``(B,)``."""
        h = self.features(images)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def gradient_penalty(
    critic: ConditionalCritic,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP's ``mean (||grad_x D(x_hat, y)|| - 1)^2`` on random interpolates of real and fake.

    ``alpha``: pre-drawn ``(len(real), 1, 1, 1)`` interpolation weights (default: drawn from ``generator``).
    """
    if alpha is None:
        alpha = torch.rand(len(real), 1, 1, 1, generator=generator, device=real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed, labels).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def critic_step(
    critic: ConditionalCritic,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    gp_weight: float,
    drift_weight: float,
    alpha: torch.Tensor | None = None,
) -> None:
    """One WGAN-GP update of ``critic`` (non-private: the critic never leaves its data's owner).

    ``alpha``: pre-drawn gradient-penalty weights, as in :func:`gradient_penalty`.
    """
    real_score, fake_score = critic(real, labels), critic(fake, labels)
    loss = (
        fake_score.mean()
        - real_score.mean()
        + gp_weight * gradient_penalty(critic, real, fake, labels, generator, alpha)
        + drift_weight * real_score.square().mean()
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def generator_loss_gradients(critic: ConditionalCritic, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``d(-D(x_i, y_i)) / d x_i`` for each sample: the only thing GS-WGAN sanitises and releases."""
    leaf = images.detach().requires_grad_(True)
    critic.requires_grad_(False)
    try:
        # Scores are per sample (no batch norm), so the gradient of their sum w.r.t. x_i is sample i's own.
        (grad,) = torch.autograd.grad(-critic(leaf, labels).sum(), leaf)
    finally:
        critic.requires_grad_(True)
    return grad


def new_generator(
    config: GANConfig, num_classes: int, seed: int, image_size: tuple[int, int] = (28, 28)
) -> ConditionalGenerator:
    """A generator initialised from the public ``seed``."""
    with public_seed(seed):
        return ConditionalGenerator(config.latent_dim, num_classes, config.generator_width, image_size)


def new_critic(
    config: GANConfig, num_classes: int, seed: int, image_size: tuple[int, int] = (28, 28)
) -> ConditionalCritic:
    """A critic initialised from the public ``seed``."""
    with public_seed(seed):
        return ConditionalCritic(num_classes, config.critic_width, image_size)


def adam(net: nn.Module, lr: float, config: GANConfig) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(config.adam_beta1, config.adam_beta2))


def update_average(average: nn.Module, current: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for avg, cur in zip(average.parameters(), current.parameters()):
            avg.lerp_(cur, 1.0 - decay)


@torch.no_grad()
def sample_generator(
    generator: ConditionalGenerator,
    samples_per_class: int,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    chunk_size: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples_per_class`` ``[0, 1]`` images per class index, grouped by class, on CPU."""
    rng = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(generator.num_classes, device=device).repeat_interleave(samples_per_class)
    images = []
    for chunk in labels.split(chunk_size):
        code = torch.randn(len(chunk), generator.latent_dim, generator=rng, device=device)
        images.append(generator(code, chunk).cpu())
    return torch.cat(images), labels.cpu()
