"""A party of a federated GAN scenario, independent of Flower.

fed-gswgan. The party keeps a conditional critic trained on its own data only, and a ledger,
both on its own disk (``state_dir``; the critic never leaves). At first contact it fixes its
plan: the most rounds it will take part in (``participations_per_party`` of the run's public
schedule) and the noise that makes them cost its (epsilon, delta) together. Every request then:

    refuse if the ledger says the plan's releases are spent                 # the party's own cap
    critic_iterations WGAN-GP updates: real images of the samples' labels (secret picks)
                                       against the coordinator's samples
    g_i = d(-D(x_i, y_i)) / d x_i for each sample x_i                        # non-private
    reply g~ = [clip_C(g_1); ...; clip_C(g_B)] + N(0, s^2 I), s = sigma * 2 C sqrt(B)
    (the ledger is written before the reply leaves)

A round asked again (the coordinator restarted from its last checkpoint) gets the reply already
released for it: sending the same release twice costs nothing, and a crash cannot make a party
spend more than its plan.

User-level DP against an untrusted coordinator. The unit is the party's whole dataset: with any
other dataset each clipped row can move anywhere within its C-ball, so a reply's sensitivity is
2 C sqrt(B) (as one GS-WGAN step). The coordinator sees every reply and chooses who takes part,
so no amplification by subsampling is claimed: a party composes its own releases at sample
rate 1. The noise comes from the party's secret randomness (:mod:`fedpsg.secret`).

fedavg-gan. The baseline that exchanges parameters: the party trains the received generator
and critic for ``local_steps`` GAN iterations on its data and returns both. Non-private.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpsg.data import dataset_spec, load_images
from fedpsg.federated_gan.config import FedGANConfig, participations_per_party
from fedpsg.federated_gan.protocol import GradientReply, ModelReply, RoundRequest
from fedpsg.federated_gan.split import party_indices
from fedpsg.files import save_atomically
from fedpsg.methods.gswgan import (
    ConditionalCritic,
    ConditionalGenerator,
    critic_step,
    generator_loss_gradients,
    sanitise,
    step_sensitivity,
)
from fedpsg.privacy import PrivacyRecord, private_record, validate_budget
from fedpsg.secret import SecretRandomness, public_seed

STATE_DIR_ENV = "FEDPSG_PARTY_STATE_DIR"
MECHANISM = "gaussian (user-level: any change of the party's dataset; sensitivity 2*C*sqrt(B))"
NON_PRIVATE = "none (non-private baseline: parameters trained on the data are sent as they are)"


class BudgetSpent(RuntimeError):
    """The party has made every release its plan allows and answers no more."""


def default_state_dir() -> Path:
    """Where a party keeps its critic and ledger: ``$FEDPSG_PARTY_STATE_DIR`` or ``~/.fedpsg/party-state``."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".fedpsg" / "party-state")


@dataclass(frozen=True)
class PartyData:
    """A party's share of the training images, in ``[0, 1]`` pixel space, with class ids."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def batch_like(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One real image of each requested label, drawn uniformly from the party's images of that label."""
        real = torch.empty(len(labels), *self.pixels.shape[1:])
        for cls in labels.unique().tolist():
            wanted = torch.nonzero(labels == cls).flatten()
            members = torch.nonzero(self.labels == cls).flatten()
            if len(members) == 0:
                raise ValueError(f"asked about class {cls}, which this party does not hold")
            real[wanted] = self.pixels[members[torch.randint(len(members), (len(wanted),), generator=generator)]]
        return real

    def random_batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(self.labels), (size,), generator=generator)
        return self.pixels[pick], self.labels[pick]


@functools.lru_cache(maxsize=4)
def _train_pixels(dataset: str, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    train = load_images(dataset, train=True, data_dir=data_dir)
    return dataset_spec(dataset).to_pixels(train.images).clamp(0, 1), train.labels


def load_party_data(request: RoundRequest, data_dir: str | None = None) -> PartyData:
    """The share of partition ``request.partition`` under the run's public split (read once per process)."""
    return _party_share(
        request.dataset, data_dir, request.num_parties, request.split, request.split_seed, request.partition
    )


# Shares are disjoint, so caching all of a process's parties holds at most one copy of the dataset;
# the split is recomputed only when a new party (or run) comes to this process.
@functools.lru_cache(maxsize=64)
def _party_share(
    dataset: str, data_dir: str | None, num_parties: int, split: str, split_seed: int, partition: int
) -> PartyData:
    pixels, labels = _train_pixels(dataset, data_dir)
    if pixels.shape[1] != 1:
        raise ValueError("the federated GAN's networks take single-channel images")
    share = party_indices(labels, num_parties, split, split_seed)[partition]
    return PartyData(pixels[share], labels[share])


def new_critic(config: FedGANConfig, num_classes: int, seed: int) -> ConditionalCritic:
    with public_seed(seed):
        return ConditionalCritic(num_classes, config.critic_width)


def new_generator(config: FedGANConfig, num_classes: int, seed: int) -> ConditionalGenerator:
    with public_seed(seed):
        return ConditionalGenerator(config.latent_dim, num_classes, config.generator_width)


def adam(net: torch.nn.Module, lr: float, config: FedGANConfig) -> torch.optim.Adam:
    return torch.optim.Adam(net.parameters(), lr=lr, betas=(config.adam_beta1, config.adam_beta2))


def local_gan_iterations(
    generator: ConditionalGenerator,
    critic: ConditionalCritic,
    data: PartyData,
    iterations: int,
    config: FedGANConfig,
    generator_optimizer: torch.optim.Optimizer,
    critic_optimizer: torch.optim.Optimizer,
    rng: torch.Generator,
) -> None:
    """Plain (non-private) WGAN-GP on the party's own data: the warm start, and FedAvg's local training."""
    for _ in range(iterations):
        for _ in range(config.critic_iterations):
            real, labels = data.random_batch(config.batch_size, rng)
            with torch.no_grad():
                fake = generator(torch.randn(len(labels), config.latent_dim, generator=rng), labels)
            critic_step(
                critic, critic_optimizer, real, fake, labels, rng,
                gp_weight=config.gp_weight, drift_weight=config.drift_weight,
            )  # fmt: skip
        labels = data.random_batch(config.batch_size, rng)[1]
        images = generator(torch.randn(len(labels), config.latent_dim, generator=rng), labels)
        generator_optimizer.zero_grad(set_to_none=True)
        images.backward(generator_loss_gradients(critic, images.detach(), labels) / len(labels))
        generator_optimizer.step()


# ----- fed-gswgan ------------------------------------------------------------------------------


def plan_privacy(request: RoundRequest) -> PrivacyRecord:
    """The noise for the most rounds this party can be asked in, at its user-level (epsilon, delta)."""
    validate_budget(request.epsilon, request.delta)
    config = request.config
    per_round = min(config.parties_per_round or request.num_parties, request.num_parties)
    return private_record(
        request.epsilon,
        request.delta,
        1.0,  # no amplification: the coordinator knows who takes part
        participations_per_party(config.rounds, per_round, request.num_parties),
        config.accountant,
        max_grad_norm=config.max_grad_norm,
        mechanism=MECHANISM,
        adjacency="user-level",
    )


class PartyCritic:
    """The party's critic, optimiser and ledger, kept in one file under its state folder."""

    def __init__(
        self,
        path: Path,
        critic: ConditionalCritic,
        optimizer: torch.optim.Optimizer,
        plan: PrivacyRecord,
        releases: int = 0,
        last_release: tuple[int, torch.Tensor] | None = None,
    ) -> None:
        self.path, self.critic, self.optimizer, self.plan = path, critic, optimizer, plan
        self.releases = releases
        self.last_release = last_release  # (round, sanitised gradients) of the latest reply

    @classmethod
    def open(cls, request: RoundRequest, data: PartyData, state_dir: Path, secret: SecretRandomness) -> PartyCritic:
        """Load the party's state for this run, or create it: plan the budget, warm-start the critic."""
        path = Path(state_dir) / request.run_id / f"party-{request.partition}.pt"
        num_classes = dataset_spec(request.dataset).num_classes
        config = request.config
        critic = new_critic(config, num_classes, seed=request.split_seed * 1_000_003 + request.partition)
        optimizer = adam(critic, config.lr_discriminator, config)
        if path.exists():
            state = torch.load(path, weights_only=True)
            critic.load_state_dict(state["critic"])
            optimizer.load_state_dict(state["optimizer"])
            last = state["last_release"]
            plan = PrivacyRecord.from_dict(state["plan"])
            return cls(path, critic, optimizer, plan, int(state["releases"]), tuple(last) if last else None)
        # The paper's warm start, on this party's data only, against a throwaway local generator.
        throwaway = new_generator(config, num_classes, seed=request.split_seed * 1_000_003 + 500_009)
        local_gan_iterations(
            throwaway, critic, data, config.pretrain_iterations, config,
            adam(throwaway, config.lr_generator, config), optimizer, secret.sampling,
        )  # fmt: skip
        party = cls(path, critic, optimizer, plan_privacy(request), releases=0)
        party.save()
        return party

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plan": self.plan.to_dict(),
            "releases": self.releases,
            "last_release": list(self.last_release) if self.last_release else None,
        }
        save_atomically(state, self.path)

    def answer(
        self,
        round_index: int,
        images: torch.Tensor,
        labels: torch.Tensor,
        data: PartyData,
        config: FedGANConfig,
        secret: SecretRandomness,
    ) -> GradientReply:
        """Train the critic on the samples, then release their sanitised gradients (one Gaussian release)."""
        if self.last_release is not None and self.last_release[0] == round_index:
            return GradientReply(self.last_release[1], self.plan, self.releases)  # already released
        if self.releases >= self.plan.steps:
            raise BudgetSpent(
                f"party's budget is spent: {self.releases} of {self.plan.steps} planned releases made "
                f"(epsilon {self.plan.epsilon:.3g}, delta {self.plan.delta:g})"
            )
        for _ in range(config.critic_iterations):
            real = data.batch_like(labels, secret.sampling)
            critic_step(
                self.critic, self.optimizer, real, images, labels, secret.sampling,
                gp_weight=config.gp_weight, drift_weight=config.drift_weight,
            )  # fmt: skip
        gradients = generator_loss_gradients(self.critic, images, labels)
        if not math.isinf(self.plan.epsilon):
            noise_std = self.plan.noise_multiplier * step_sensitivity(config.max_grad_norm, len(labels))
            gradients = sanitise(gradients, config.max_grad_norm, noise_std, secret.noise)
        self.releases += 1
        self.last_release = (round_index, gradients.detach())
        self.save()  # the ledger counts the release before it leaves
        return GradientReply(gradients, self.plan, self.releases)


def answer_samples(
    request: RoundRequest,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    data_dir: str | None = None,
    state_dir: Path | None = None,
    secret: SecretRandomness | None = None,
) -> GradientReply:
    """A fed-gswgan round on this party: ``secret`` defaults to fresh OS entropy."""
    secret = secret or SecretRandomness.fresh()
    data = load_party_data(request, data_dir)
    party = PartyCritic.open(request, data, state_dir or default_state_dir(), secret)
    return party.answer(request.round, images.float(), labels.long(), data, request.config, secret)


# ----- fedavg-gan ------------------------------------------------------------------------------


def answer_models(
    request: RoundRequest,
    generator_state: dict[str, torch.Tensor],
    critic_state: dict[str, torch.Tensor],
    *,
    data_dir: str | None = None,
    secret: SecretRandomness | None = None,
) -> ModelReply:
    """A fedavg-gan round on this party: local GAN training from the received parameters."""
    secret = secret or SecretRandomness.fresh()
    config = request.config
    data = load_party_data(request, data_dir)
    num_classes = dataset_spec(request.dataset).num_classes
    generator, critic = new_generator(config, num_classes, 0), new_critic(config, num_classes, 0)
    generator.load_state_dict(generator_state)
    critic.load_state_dict(critic_state)
    local_gan_iterations(
        generator, critic, data, config.local_steps, config,
        adam(generator, config.lr_generator, config), adam(critic, config.lr_discriminator, config), secret.sampling,
    )  # fmt: skip
    privacy = PrivacyRecord(
        epsilon=math.inf,
        delta=request.delta,
        noise_multiplier=0.0,
        steps=1,  # this reply; the party keeps no ledger for a non-private baseline
        sample_rate=1.0,
        accountant=config.accountant,
        mechanism=NON_PRIVATE,
        adjacency="user-level",
    )
    return ModelReply(generator.state_dict(), critic.state_dict(), privacy, releases=1)
