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
from dataclasses import dataclass

import torch
from torch import nn

from fedpsg.data.datasets import partition_class_indices
from fedpsg.dp.accounting import PrivacyRecord, private_record
from fedpsg.dp.mechanisms import Contribution, gaussian_mechanism
from fedpsg.dp.secret import SecretRandomness
from fedpsg.io.progress import Progress
from fedpsg.methods.base import Method, PartyStage, Release, register_method
from fedpsg.nn.evaluation import EvalConfig
from fedpsg.nn.gan import (
    ConditionalCritic,
    ConditionalGenerator,
    GANConfig,
    adam,
    critic_step,
    generator_loss_gradients,
    new_critic,
    new_generator,
    sample_generator,
    update_average,
)

__all__ = [
    "GSWGAN",
    "GSWGANConfig",
    "GSWGAN_EVALUATION",
    "GSWGAN_PRESETS",
    "MECHANISM",
    "Critic",
    "GSWGANTrainer",
    "assign_subsets",
    "clip_per_sample",
    "sanitise",
    "step_sensitivity",
    "train_gswgan",
]

MECHANISM = "subsampled-gaussian (1 of K critics per step, sensitivity 2*C*sqrt(B))"


@dataclass(frozen=True)
class GSWGANConfig(GANConfig):
    """Hyper-parameters of GS-WGAN (defaults: the paper's; see GSWGAN_PRESETS for the profiles)."""

    num_discriminators: int = 1000  # K: disjoint data subsets, one critic each; sample rate q = 1 / K
    generator_iterations: int = 20000  # T: private generator steps, one Gaussian release each
    spc: int = 10  # images per class released (the scenario's set size) ...
    samples_per_class: int | None = None  # ... unless this is set: a generator's samples cost no privacy

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [name for name in ("num_discriminators", "generator_iterations", "spc") if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"must be >= 1: {', '.join(bad)}")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1 (or null for spc), got {self.samples_per_class}")

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


def sanitise(
    gradients: torch.Tensor, max_norm: float, noise_std: float, generator: torch.Generator, *, sample_rate: float
) -> torch.Tensor:
    """One release: per-sample clipping to ``max_norm``, then Gaussian noise of std ``noise_std``.

    ``sample_rate``: the rate at which an example's critic is the one asked (what the accountant assumed).
    """
    # An example can move each of the B rows anywhere in its C-ball (step_sensitivity): by 2C per row.
    contribution = Contribution(
        step_sensitivity(max_norm, len(gradients)),
        sample_rate,
        clip=lambda rows: [clip_per_sample(rows[0].flatten(0, 1), 2 * max_norm).view_as(rows[0])],
        rows=len(gradients),
    )
    (noisy,) = gaussian_mechanism(
        [clip_per_sample(gradients, max_norm)], noise_std, generator, contribution=contribution
    )
    return noisy


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
class Critic:
    net: ConditionalCritic
    optimizer: torch.optim.Optimizer
    subset: torch.Tensor  # indices into the party's data


class GSWGANTrainer:
    """The state of one GS-WGAN run: data in pixel space, critics, generator, random streams.

    What the party keeps beside each critic and what the generator's per-sample loss is are the
    methods :meth:`new_critic`, :meth:`critic_update` and :meth:`loss_gradients`: a variant
    (DP-GAN-DPAC) overrides them and keeps the loop, the draws, the sanitisation and the accounting.
    """

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
        seed = self.seed * 100_003 + index
        return new_generator(self.config, self.num_classes, seed, self.image_size).to(self.device)

    def generator_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        return adam(net, self.config.lr_generator, self.config)

    def new_critic(self, index: int, subset: torch.Tensor) -> Critic:
        seed = self.seed * 100_003 + 50_021 + index
        net = new_critic(self.config, self.num_classes, seed, self.image_size).to(self.device)
        return Critic(net, adam(net, self.config.lr_discriminator, self.config), subset)

    def codes(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.config.latent_dim, generator=self.public, device=self.device)

    def critic_update(self, critic: Critic, generator: ConditionalGenerator) -> None:
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
        real, labels = self.real_batch(critic)
        with torch.no_grad():
            fake = generator(codes[: len(real)], labels)
        critic_step(
            critic.net, critic.optimizer, real, fake, labels, self.public,
            gp_weight=self.config.gp_weight, drift_weight=self.config.drift_weight, alpha=alpha[: len(real)],
        )  # fmt: skip

    def real_batch(self, critic: Critic) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to a batch of the critic's own (non-empty) subset, drawn from the secret sampling stream."""
        pick = torch.randperm(len(critic.subset), generator=self.secret.sampling)[: self.config.batch_size]
        index = critic.subset[pick].to(self.device)
        return self.pixels[index], self.labels[index]

    def generated_batch(self, generator: ConditionalGenerator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of generated images and their labels (labels, then codes, from the public stream)."""
        labels = self.labels_for_generator()
        return generator(self.codes(len(labels)), labels), labels

    def sample_gradients(self, critic: Critic, generator: ConditionalGenerator) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated images ``x`` (attached to the generator) and ``d(-D(x_i, y_i)) / d x_i`` for each."""
        images, labels = self.generated_batch(generator)
        return images, self.loss_gradients(critic, images.detach(), labels)

    def loss_gradients(self, critic: Critic, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The gradient of each generated sample's loss w.r.t. that sample: GS-WGAN's ``d(-D(x_i, y_i)) / d x_i``."""
        return generator_loss_gradients(critic.net, images, labels)

    def labels_for_generator(self) -> torch.Tensor:
        """A batch of class indices for generated samples, from the public stream."""
        return torch.randint(self.num_classes, (self.config.batch_size,), generator=self.public, device=self.device)

    def warm_start(self, critic: Critic, index: int, progress: Progress) -> None:
        """The paper's non-private warm start: a GAN game on the critic's subset against a throwaway generator."""
        generator = self.new_generator(1 + index)
        optimizer = self.generator_optimizer(generator)
        for _ in range(self.config.pretrain_iterations):
            for _ in range(self.config.critic_iterations):
                self.critic_update(critic, generator)
            images, grad = self.sample_gradients(critic, generator)
            optimizer.zero_grad(set_to_none=True)
            images.backward(grad / len(grad))
            optimizer.step()
            progress.step()


def train_gswgan(trainer: GSWGANTrainer, *, record: PrivacyRecord, progress: Progress) -> ConditionalGenerator:
    """Train a DP conditional generator on the trainer's data (``[0, 1]`` pixels, class indices).

    Returns the generator to sample (the moving average if ``config.ema_decay > 0``); ``record``
    is the planned mechanism (its noise multiplier; infinite epsilon: no clipping, no noise).
    The trainer's secret draws the split, the picks, the critics' batches and the noise; its
    public seed drives everything public.
    """
    config, secret = trainer.config, trainer.secret
    private = not math.isinf(record.epsilon)
    noise_std = record.noise_multiplier * step_sensitivity(config.max_grad_norm, config.batch_size)

    subsets = assign_subsets(len(trainer.labels), config.num_discriminators, secret.sampling)
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
        images, grad = trainer.sample_gradients(critic, generator)
        if private:
            grad = sanitise(grad, config.max_grad_norm, noise_std, secret.noise, sample_rate=record.sample_rate)
        optimizer.zero_grad(set_to_none=True)
        images.backward(grad / len(grad))  # the mean over the batch, taken after the noise
        optimizer.step()
        if average is not generator:
            # Warm-up (a plain running mean at first), so that early iterates do not dominate short runs.
            update_average(average, generator, min(config.ema_decay, step / (step + 1)))
        progress.step()
    return average.eval()


@register_method
class GSWGAN(Method):
    """GS-WGAN as a party method: a DP conditional generator, released as a synthetic set."""

    name = "gswgan"
    label = "GS-WGAN"
    releases = "synthetic"
    config_class = GSWGANConfig
    presets = GSWGAN_PRESETS
    evaluation = GSWGAN_EVALUATION
    trainer_class: type[GSWGANTrainer] = GSWGANTrainer

    def plan(self, stage: PartyStage, config: GSWGANConfig) -> PrivacyRecord:
        """T subsampled Gaussian steps at q = 1/K (noise multiplier w.r.t. 2 C sqrt(B))."""
        if len(stage.data) < 1:
            raise ValueError(f"{self.label} needs at least one private example")
        return private_record(
            stage.epsilon,
            stage.delta,
            1.0 / config.num_discriminators,
            config.generator_iterations,
            config.accountant,
            max_grad_norm=config.max_grad_norm,
            mechanism=MECHANISM,
            dataset_size=len(stage.data),
        )

    def steps(self, stage: PartyStage, config: GSWGANConfig) -> int:
        return config.num_discriminators * config.pretrain_iterations + config.generator_iterations

    def release(
        self, stage: PartyStage, config: GSWGANConfig, plan: PrivacyRecord, secret: SecretRandomness, progress: Progress
    ) -> Release:
        """Train the generator on the party's data and sample ``config.released_per_class`` images per class.

        The images are normalised like the real data, with the original class ids.
        """
        data, spec = stage.data, stage.spec
        class_ids, indices = partition_class_indices(data, stage.classes)
        if data.images.shape[1] != 1:
            raise ValueError(f"{self.label}'s networks take single-channel images")
        pixels = spec.to_pixels(data.images).clamp(0, 1).to(stage.device)  # the generator's sigmoid range
        labels = indices.to(stage.device)
        trainer = self.trainer_class(
            pixels, labels, len(class_ids), config, device=stage.device, seed=stage.seed, secret=secret
        )
        generator = train_gswgan(trainer, record=plan, progress=progress)
        images, index_labels = sample_generator(
            generator, config.released_per_class, device=stage.device, seed=stage.seed + 2
        )
        return Release(plan, images=spec.normalise(images).float(), labels=class_ids[index_labels].long())
