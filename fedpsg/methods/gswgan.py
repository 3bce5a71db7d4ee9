"""GS-WGAN (Chen, Orekondy & Fritz, NeurIPS 2020): a generator trained through sanitised gradients.

A party splits its private data into K disjoint subsets and gives each to its own conditional
critic (WGAN-GP discriminator), warm-started non-privately on that subset alone. The
conditional generator G(z, y) then never touches the data; it learns only from the gradient
of the critics' verdict on its own samples, and that gradient is sanitised:

    subsets = each example assigned to one of K subsets, uniformly and independently      # secret
    pretrain critic k on subsets[k] against a throwaway generator, for every k             # non-private
    for t in 1..T:
        k ~ Uniform{1..K}                                                                 # secret
        critic_iterations WGAN-GP updates of critic k on real batches of subsets[k]      # non-private
        x_i = G(z_i, y_i), i = 1..B                                   # public codes and labels
        g_i = d(-D_k(x_i, y_i)) / d x_i                       # gradient w.r.t. each sample
        g~  = [clip_C(g_1); ...; clip_C(g_B)] + N(0, s^2 I)   # ONE Gaussian release, s = sigma * 2 C sqrt(B)
        G  <- Adam step on (1/B) sum_i <g~_i, x_i>             # x.backward(g~ / B): post-processing

``clip_C(g) = g * min(1, C / ||g||)``. Only the generator's knowledge leaves the party: the
critics, their subsets and the picks stay inside. ``epsilon = inf`` is the non-private
reference: no clipping and no noise.

What is released. After training, the party samples ``samples_per_class`` images per class
(default: the scenario's ``spc``) from the generator and releases them as a synthetic set, not
the generator's weights. Both are DP (the weights are a function of the noisy releases only,
and sampling is post-processing of the weights), but a set goes through the same replay
pipeline, protocol and evaluation as the other set-releasing methods (PSG, DP-Merf, dpdm), so
the comparison is like for like. A generator can afford many samples for free: a larger
``samples_per_class`` (``--set gswgan.samples_per_class=300``) costs no privacy, only replay
time; see the presets for what the profiles use.

Accounting. Neighbouring datasets differ by one example x (add/remove, as the rest of fedpsg).
Each example's subset is drawn independently, so adding x changes one subset, k*, and leaves
the others as they were; a generator step depends on x only if it picks critic k*, which happens
independently at every step with probability q = 1/K: the paper's subsampling. A step that picks
k* releases the B x d matrix of clipped gradients, each row within the C-ball whatever the
critic (trained with or without x) is, so its L2 sensitivity is Delta = 2 C sqrt(B). Its output
distributions under the two datasets are (1 - q) A + q N(g, s^2) and (1 - q) A + q N(g', s^2),
A the (common) mixture over the other critics; by joint convexity A reduces to one Gaussian
inside the same ball, and the worst case is then the Poisson-subsampled Gaussian pair at
sensitivity Delta (checked numerically in one dimension), which is what Opacus's accountant
composes: T steps at rate q with noise multiplier sigma = s / Delta, calibrated by
:func:`fedpsg.dp.accounting.private_record`. Every release goes through
:func:`fedpsg.dp.mechanisms.gaussian_mechanism`, once per generator step.

Two differences from the authors' code (DingfanChen/GS-WGAN), both about accounting:

* ``evaluation/privacy_analysis.py`` composes T * B subsampled Gaussian mechanisms, one per
  generated sample, as if each sample drew its own critic. The B samples of a step share the
  critic, so a step is one subsampled release of the whole batch. At the paper's settings
  (K = 1000, T = 20000, B = 32) the code's default noise, 2 * 1.07 C per coordinate, is what its
  accounting puts at epsilon = 10; composing T batch releases at sensitivity 2 C sqrt(B) reaches
  epsilon = 10 (delta = 1e-5) at sigma = 0.47, i.e. 5.3 C per coordinate: 2.5 times the noise.
  The noise of the batch mean is then 2 sigma C per coordinate whatever B, so a larger batch
  no longer improves a step's signal-to-noise ratio; it only costs compute.
* The code clips each sample's gradient of the batch *mean* to C / B; here each sample's own
  gradient is clipped to C (the same ratio, the paper's definition) and the mean over the
  batch is taken after the noise.

A caveat the paper's analysis shares: a critic's state also depends on which earlier steps
picked it, so the picks are not perfectly fresh from step to step; like the paper, the accountant
treats each step's choice as an independent subsampling.

Randomness. The subset assignment, the picks and the critics' real batches come from the
party's secret sampling stream, the noise from its secret noise stream
(:class:`fedpsg.dp.secret.SecretRandomness`). The public ``seed`` drives the network
initialisations, the latent codes and labels, the gradient-penalty interpolation and the
sampling of the release.

Settings follow the paper and its code (``source/config.py``, ``main.py``, ``pretrain.py``):
1000 critics, 2000 warm-start iterations each, 20000 generator iterations, batch 32, C = 1,
lambda_gp = 10, drift penalty 0.001, 5 critic iterations per generator iteration, Adam lr 1e-4
with betas (0.5, 0.9), latent dimension 10, width 64, an exponential moving average of the
generator (0.999) is what gets sampled. The networks are small DCGAN-style ones of our own
(the code's default generator is a ResNet; its latent code is Bernoulli, ours Gaussian).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedpsg.data.datasets import DatasetSpec, ImageSet, partition_class_indices
from fedpsg.dp.accounting import ACCOUNTANTS, PrivacyRecord, private_record, validate_budget
from fedpsg.dp.mechanisms import gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness, public_seed
from fedpsg.io.progress import Progress
from fedpsg.methods.base import Method, PartyStage, Release, register_method
from fedpsg.nn.evaluation import EvalConfig

__all__ = [
    "GSWGAN",
    "GSWGANConfig",
    "GSWGAN_EVALUATION",
    "GSWGAN_PRESETS",
    "ConditionalCritic",
    "ConditionalGenerator",
    "MECHANISM",
    "assign_subsets",
    "clip_per_sample",
    "critic_step",
    "generator_loss_gradients",
    "gradient_penalty",
    "gswgan_generate",
    "privacy_of",
    "sample_generator",
    "sanitise",
    "step_sensitivity",
    "update_average",
]

MECHANISM = "subsampled-gaussian (1 of K critics per step, sensitivity 2*C*sqrt(B))"


@dataclass(frozen=True)
class GSWGANConfig:
    """Hyper-parameters of GS-WGAN (defaults: the paper's; see GSWGAN_PRESETS for the profiles)."""

    num_discriminators: int = 1000  # K: disjoint data subsets, one critic each; sample rate q = 1 / K
    generator_iterations: int = 20000  # T: private generator steps, one Gaussian release each
    pretrain_iterations: int = 2000  # non-private warm-start GAN iterations per critic, on its own subset
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
    spc: int = 10  # images per class released (the scenario's set size) ...
    samples_per_class: int | None = None  # ... unless this is set: a generator's samples cost no privacy
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        positive = [
            "num_discriminators", "generator_iterations", "critic_iterations", "batch_size",
            "latent_dim", "generator_width", "critic_width", "spc",
        ]  # fmt: skip
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")
        if self.pretrain_iterations < 0:
            raise ValueError(f"pretrain_iterations must be >= 0, got {self.pretrain_iterations}")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1 (or null for spc), got {self.samples_per_class}")
        if not (self.max_grad_norm > 0 and self.lr_generator > 0 and self.lr_discriminator > 0):
            raise ValueError("max_grad_norm, lr_generator and lr_discriminator must be > 0")
        if self.gp_weight < 0 or self.drift_weight < 0:
            raise ValueError("gp_weight and drift_weight must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and 0 <= self.ema_decay < 1):
            raise ValueError("adam_beta1, adam_beta2 and ema_decay must be in [0, 1)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; available: {', '.join(ACCOUNTANTS)}")

    @property
    def released_per_class(self) -> int:
        return self.samples_per_class if self.samples_per_class is not None else self.spc


GSWGAN_PRESETS: dict[str, GSWGANConfig] = {
    # The paper's settings (DingfanChen/GS-WGAN, source/config.py): a GPU job of many hours.
    "paper": GSWGANConfig(samples_per_class=6000),
    # A few minutes per 2-class stage (~12000 images) on 2 shared CPU cores. Under the noise of an
    # honest batch release a step's signal-to-noise ratio does not grow with B (see above), so
    # the compute goes into steps instead: B = 8, one critic update per step, narrow networks,
    # and many critics (q = 1/200, sigma ~0.58 at epsilon 10), each warm-started for 20 GAN
    # iterations (5 were too few: the samples stayed blobs). Faster lrs than the paper's. Its
    # noisy samples need numbers: on MNIST 5/6 at epsilon 10, 300 per class trained classifiers
    # to ~91% on the real test images where the first 10 per class left them at chance.
    "cpu": GSWGANConfig(
        num_discriminators=200,
        generator_iterations=5000,
        pretrain_iterations=20,
        critic_iterations=1,
        batch_size=8,
        lr_generator=1e-3,
        lr_discriminator=1e-3,
        generator_width=16,
        critic_width=16,
        samples_per_class=300,
    ),
    # Seconds, for tests.
    "tiny": GSWGANConfig(
        num_discriminators=10,  # q = 0.1: the accountant calibrates small q faster
        generator_iterations=12,
        pretrain_iterations=1,
        critic_iterations=1,
        batch_size=16,
        lr_generator=1e-3,
        lr_discriminator=1e-3,
        generator_width=8,
        critic_width=8,
        ema_decay=0.9,
        samples_per_class=20,
    ),
}

# Its sets hold hundreds to thousands of samples per class: DP-Merf's evaluation, not the
# 1000 epochs a 10-image set needs.
GSWGAN_EVALUATION: dict[str, EvalConfig] = {
    "paper": EvalConfig(width=128, epochs=60, augment=True, num_evals=3),
    "cpu": EvalConfig(width=32, epochs=40, augment=True, num_evals=2),
    "tiny": EvalConfig(width=16, epochs=30, augment=False, num_evals=1),
}


# ---------------------------------------------------------------------------------------------
# Networks (images in [0, 1] pixel space, (B, 1, H, W))
# ---------------------------------------------------------------------------------------------


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


class ConditionalCritic(nn.Module):
    """Three 5x5 stride-2 convs and a projection head: ``D(x, y) = w . h(x) + e_y . h(x)``.

    No batch norm: the gradient penalty and the per-sample gradients need each sample's score
    to depend on that sample only.
    """

    def __init__(self, num_classes: int, width: int = 64, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, kernel_size=5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, kernel_size=5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        with torch.no_grad():
            dim = self.features(torch.zeros(1, 1, *image_size)).shape[1]
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


# ---------------------------------------------------------------------------------------------
# Sanitisation and accounting
# ---------------------------------------------------------------------------------------------


def clip_per_sample(gradients: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each sample's gradient (first dimension) scaled by ``min(1, C / ||g_i||)``: norms at most ``max_norm``."""
    norms = torch.linalg.vector_norm(gradients.flatten(1), dim=1)
    # where(), not min(1, C / (norm + tiny)): gradients within the bound stay exactly as they are.
    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=max_norm), torch.ones_like(norms))
    return gradients * scale.view(-1, *([1] * (gradients.dim() - 1)))


def step_sensitivity(max_grad_norm: float, batch_size: int) -> float:
    """L2 sensitivity of one step's clipped ``(B, d)`` gradients: ``2 C sqrt(B)``.

    The critic trained with or without the example can be anything, so each of the B rows
    (all from that one critic) can move anywhere within its C-ball: by up to 2C.
    """
    return 2.0 * max_grad_norm * math.sqrt(batch_size)


def sanitise(gradients: torch.Tensor, max_norm: float, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """One release: per-sample clipping to ``max_norm``, then Gaussian noise of std ``noise_std``."""
    (noisy,) = gaussian_mechanism([clip_per_sample(gradients, max_norm)], noise_std, generator)
    return noisy


def privacy_of(config: GSWGANConfig, dataset_size: int, epsilon: float, delta: float) -> PrivacyRecord:
    """What a run will spend: T subsampled Gaussian steps at q = 1/K (noise multiplier w.r.t. 2 C sqrt(B))."""
    if dataset_size < 1:
        raise ValueError("GS-WGAN needs at least one private example")
    return private_record(
        epsilon,
        delta,
        1.0 / config.num_discriminators,
        config.generator_iterations,
        config.accountant,
        max_grad_norm=config.max_grad_norm,
        mechanism=MECHANISM,
        dataset_size=dataset_size,
    )


def assign_subsets(n: int, num_subsets: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Indices of ``n`` examples split into disjoint subsets, each example's drawn uniformly and independently.

    Independent draws (rather than equal chunks of a permutation) make the split stable under
    adding or removing an example: the other examples keep their subsets. A subset may be empty.
    """
    owner = torch.randint(num_subsets, (n,), generator=generator)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=num_subsets).tolist()
    return list(order.split(counts))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class _Critic:
    net: ConditionalCritic
    optimizer: torch.optim.Optimizer
    subset: torch.Tensor  # indices into the party's data


class _Trainer:
    """The state of one GS-WGAN run: data in pixel space, critics, generator, random streams."""

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        config: GSWGANConfig,
        *,
        device: str | torch.device,
        seed: int,
        secret: SecretRandomness,
    ) -> None:
        self.pixels, self.labels, self.num_classes, self.config = pixels, labels, num_classes, config
        self.device, self.seed, self.secret = device, seed, secret
        self.image_size = tuple(pixels.shape[-2:])
        self.public = torch.Generator(device=device).manual_seed(seed)  # codes, labels, GP interpolation

    def new_generator(self, index: int) -> ConditionalGenerator:
        with public_seed(self.seed * 100_003 + index):
            net = ConditionalGenerator(
                self.config.latent_dim, self.num_classes, self.config.generator_width, self.image_size
            )
        return net.to(self.device)

    def generator_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        return torch.optim.Adam(net.parameters(), lr=self.config.lr_generator, betas=betas)

    def new_critic(self, index: int, subset: torch.Tensor) -> _Critic:
        with public_seed(self.seed * 100_003 + 50_021 + index):
            net = ConditionalCritic(self.num_classes, self.config.critic_width, self.image_size).to(self.device)
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        return _Critic(net, torch.optim.Adam(net.parameters(), lr=self.config.lr_discriminator, betas=betas), subset)

    def codes(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.latent_dim, generator=self.public, device=self.device)

    def critic_update(self, critic: _Critic, generator: ConditionalGenerator) -> None:
        """One non-private WGAN-GP step of ``critic`` on a real batch of its own subset (drawn secretly).

        Always draws a full batch of codes and penalty weights from the public stream, and uses
        only as many as the subset fills: the public stream's later draws must not depend on how
        many private examples a subset holds.
        """
        batch = self.config.batch_size
        codes = self.codes(batch)
        alpha = torch.rand(batch, 1, 1, 1, generator=self.public, device=self.device)
        if len(critic.subset) == 0:
            return  # nothing to learn from; the critic still answers the generator's queries
        pick = torch.randperm(len(critic.subset), generator=self.secret.sampling)[:batch]
        index = critic.subset[pick].to(self.device)
        real, labels = self.pixels[index], self.labels[index]
        with torch.no_grad():
            fake = generator(codes[: len(real)], labels)
        critic_step(
            critic.net, critic.optimizer, real, fake, labels, self.public,
            gp_weight=self.config.gp_weight, drift_weight=self.config.drift_weight, alpha=alpha[: len(real)],
        )  # fmt: skip

    def sample_gradients(
        self, critic: ConditionalCritic, generator: ConditionalGenerator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated images ``x`` (attached to the generator) and ``d(-D(x_i, y_i)) / d x_i`` for each."""
        labels = torch.randint(self.num_classes, (self.config.batch_size,), generator=self.public, device=self.device)
        images = generator(self.codes(len(labels)), labels)
        return images, generator_loss_gradients(critic, images.detach(), labels)

    def warm_start(self, critic: _Critic, index: int, progress: Progress | None) -> None:
        """The paper's non-private warm start: a GAN game on the critic's subset against a throwaway generator."""
        generator = self.new_generator(1 + index)
        optimizer = self.generator_optimizer(generator)
        for _ in range(self.config.pretrain_iterations):
            for _ in range(self.config.critic_iterations):
                self.critic_update(critic, generator)
            images, grad = self.sample_gradients(critic.net, generator)
            optimizer.zero_grad(set_to_none=True)
            images.backward(grad / len(grad))
            optimizer.step()
            if progress is not None:
                progress.step()


def update_average(average: nn.Module, current: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for avg, cur in zip(average.parameters(), current.parameters()):
            avg.lerp_(cur, 1.0 - decay)


def train_gswgan(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    config: GSWGANConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    secret: SecretRandomness | None = None,
    progress: Progress | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[ConditionalGenerator, PrivacyRecord]:
    """Train a DP conditional generator on ``pixels`` (``[0, 1]``, ``(N, 1, H, W)``) and class indices ``labels``.

    Returns the generator to sample (the moving average if ``config.ema_decay > 0``) and the
    privacy record. ``secret`` draws the split, the picks, the critics' batches and the noise
    (default: fresh OS entropy); ``seed`` drives everything public. ``callback(step)`` runs after
    every private generator step.
    """
    validate_budget(epsilon, delta)
    record = privacy_of(config, len(labels), epsilon, delta)
    private = not math.isinf(epsilon)
    noise_std = record.noise_multiplier * step_sensitivity(config.max_grad_norm, config.batch_size)
    secret = secret or SecretRandomness.fresh(device)
    trainer = _Trainer(
        pixels.to(device), labels.to(device), num_classes, config, device=device, seed=seed, secret=secret
    )

    subsets = assign_subsets(len(labels), config.num_discriminators, secret.sampling)
    critics = []
    for index, subset in enumerate(subsets):
        critics.append(trainer.new_critic(index, subset))
        trainer.warm_start(critics[-1], index, progress)

    generator = trainer.new_generator(0)
    optimizer = trainer.generator_optimizer(generator)
    average = copy.deepcopy(generator).requires_grad_(False) if config.ema_decay > 0 else generator
    for step in range(config.generator_iterations):
        pick = int(torch.randint(config.num_discriminators, (), generator=secret.sampling))
        critic = critics[pick]
        for _ in range(config.critic_iterations):
            trainer.critic_update(critic, generator)
        images, grad = trainer.sample_gradients(critic.net, generator)
        if private:
            grad = sanitise(grad, config.max_grad_norm, noise_std, secret.noise)
        optimizer.zero_grad(set_to_none=True)
        images.backward(grad / len(grad))  # the mean over the batch, taken after the noise
        optimizer.step()
        if average is not generator:
            # Warm-up (a plain running mean at first), so that early iterates do not dominate short runs.
            update_average(average, generator, min(config.ema_decay, step / (step + 1)))
        if callback is not None:
            callback(step)
        if progress is not None:
            progress.step()
    return average.eval(), record


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


def gswgan_generate(
    data: ImageSet,
    classes: list[int],
    spec: DatasetSpec,
    *,
    epsilon: float,
    delta: float,
    config: GSWGANConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    secret: SecretRandomness | None = None,
    progress: Progress | None = None,
) -> tuple[ImageSet, PrivacyRecord]:
    """Train GS-WGAN on a party's ``data`` (normalised, only ``classes``) and sample its release.

    Returns ``config.released_per_class`` images per class, normalised like the real data, with
    the original class ids, and the privacy record.
    """
    class_ids, indices = partition_class_indices(data, classes)
    if len(data) == 0:
        raise ValueError("GS-WGAN needs at least one private example")
    if data.images.shape[1] != 1:
        raise ValueError("GS-WGAN's networks take single-channel images")
    pixels = spec.to_pixels(data.images).clamp(0, 1)  # the generator's sigmoid range
    generator, record = train_gswgan(
        pixels,
        indices,
        len(class_ids),
        epsilon=epsilon,
        delta=delta,
        config=config,
        device=device,
        seed=seed,
        secret=secret,
        progress=progress,
    )
    images, index_labels = sample_generator(generator, config.released_per_class, device=device, seed=seed + 2)
    return ImageSet(spec.normalise(images).float(), class_ids[index_labels].long()), record


@register_method
class GSWGAN(Method):
    """GS-WGAN as a party method: a DP conditional generator, released as a synthetic set."""

    name = "gswgan"
    label = "GS-WGAN"
    releases = "synthetic"
    config_class = GSWGANConfig
    presets = GSWGAN_PRESETS
    evaluation = GSWGAN_EVALUATION

    def plan(self, stage: PartyStage, config: GSWGANConfig) -> PrivacyRecord:
        return privacy_of(config, len(stage.data), stage.epsilon, stage.delta)

    def run(self, stage: PartyStage, config: GSWGANConfig, secret: SecretRandomness | None = None) -> Release:
        total = config.num_discriminators * config.pretrain_iterations + config.generator_iterations
        generated, record = gswgan_generate(
            stage.data,
            stage.classes,
            stage.spec,
            epsilon=stage.epsilon,
            delta=stage.delta,
            config=config,
            device=stage.device,
            seed=stage.seed,
            secret=secret,
            progress=stage.progress(total),
        )
        return Release(record, images=generated.images, labels=generated.labels)
