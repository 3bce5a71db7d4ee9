"""A party of a federated GAN scenario, independent of Flower.

fed-gswgan. The party keeps a conditional critic trained on its own data only, in its own folder
(the critic never leaves). Its share of the data is fixed by its policy (``share``), never by
the request. At a run's first contact it fixes the run's plan: the most rounds it will take part
in (``participations_per_party`` of the run's public schedule) and the noise that makes them cost
the run's (epsilon, delta), which its policy must allow for one run. Every request then:

    refuse if the run's plan is spent, or if the release does not fit the lifetime ledger
    write the release to the ledger                                          # before computing
    critic_iterations WGAN-GP updates: real images of the samples' labels (secret picks)
                                       against the coordinator's samples
    g_i = d(-D(x_i, y_i)) / d x_i for each sample x_i                        # non-private
    reply g~ = [clip_C(g_1); ...; clip_C(g_B)] + N(0, s^2 I), s = sigma * 2 C sqrt(B)

A round asked again with the same samples (the coordinator restarted from its last checkpoint)
gets the reply already released for it, at no cost; the same round with other samples is a new
release, charged like any other. A party answers one request of a run at a time (a file lock).

User-level DP against an untrusted coordinator. The unit is the party's whole dataset: with any
other dataset each clipped row can move anywhere within its C-ball, so a reply's sensitivity is
2 C sqrt(B) (as one GS-WGAN step). The coordinator sees every reply and chooses who takes part,
so no amplification by subsampling is claimed: a party composes its own releases at sample
rate 1. The noise comes from the party's secret randomness (:mod:`fedpsg.dp.secret`).

fedavg-gan. The baseline that exchanges parameters: the party trains the received generator
and critic for ``local_steps`` GAN iterations on its data and returns both. Non-private: a party
answers it only if its policy says it trusts the coordinator, and records it in its ledger.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpsg.budget.ledger import Ledger, exclusive_lock
from fedpsg.budget.policy import PartyPolicy, Refused
from fedpsg.data.datasets import dataset_spec, load_images
from fedpsg.dp.accounting import PrivacyRecord, epsilon_spent, private_record, validate_budget
from fedpsg.dp.secret import SecretRandomness
from fedpsg.federated_gan.config import FedGANConfig, participations_per_party
from fedpsg.federated_gan.protocol import GradientReply, ModelReply, RoundRequest
from fedpsg.federated_gan.split import party_indices
from fedpsg.io.files import save_atomically
from fedpsg.methods.gswgan import sanitise, step_sensitivity
from fedpsg.nn.gan import (
    ConditionalCritic,
    ConditionalGenerator,
    adam,
    critic_step,
    generator_loss_gradients,
    new_critic,
    new_generator,
)

MECHANISM = "gaussian (user-level: any change of the party's dataset; sensitivity 2*C*sqrt(B))"
NON_PRIVATE = "none (non-private baseline: parameters trained on the data are sent as they are)"


class BudgetSpent(Refused):
    """The party has made every release the run's plan allows and answers no more in this run."""


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


def load_party_data(request: RoundRequest, policy: PartyPolicy, data_dir: str | None = None) -> PartyData:
    """The party's share under the split its policy fixes (read once per process); refuse a request for another."""
    share = policy.share
    who, what = f"party {request.partition}", f"round {request.round} of run {request.run_id!r}"
    if share is None:
        raise Refused(f"{who} refuses {what}: its policy names no share of the data (policy key 'share')")
    asked = (request.num_parties, request.split, request.split_seed)
    if asked != (share.parties, share.split, share.seed):
        raise Refused(
            f"{who} refuses {what}: it holds share {request.partition} of {share.parties} parties "
            f"({share.split}, seed {share.seed}); the request assumes {asked}"
        )
    return _party_share(request.dataset, data_dir, share.parties, share.split, share.seed, request.partition)


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


def samples_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Names the samples a reply was computed for, so a retried round is answered from cache only for them."""
    digest = hashlib.sha256(images.detach().cpu().float().numpy().tobytes())
    digest.update(labels.cpu().long().numpy().tobytes())
    return digest.hexdigest()


def round_record(plan: PrivacyRecord) -> PrivacyRecord:
    """One round's release under the run's plan: a single Gaussian mechanism at the plan's noise."""
    epsilon = epsilon_spent(plan.noise_multiplier, 1.0, 1, plan.delta, plan.accountant)
    return PrivacyRecord(**{**plan.to_dict(), "epsilon": epsilon, "steps": 1})


class PartyCritic:
    """The party's critic, optimiser and the run's plan, kept in one file in the party's folder."""

    def __init__(
        self,
        path: Path,
        critic: ConditionalCritic,
        optimizer: torch.optim.Optimizer,
        plan: PrivacyRecord,
        last_release: tuple[int, str, torch.Tensor] | None = None,
    ) -> None:
        self.path, self.critic, self.optimizer, self.plan = path, critic, optimizer, plan
        self.last_release = last_release  # (round, samples digest, sanitised gradients) of the latest reply

    @classmethod
    def open(cls, request: RoundRequest, data: PartyData, path: Path, secret: SecretRandomness) -> PartyCritic:
        """Load the party's state for this run, or create it: plan the run, warm-start the critic."""
        num_classes = dataset_spec(request.dataset).num_classes
        config = request.config
        critic = new_critic(config, num_classes, seed=request.split_seed * 1_000_003 + request.partition)
        optimizer = adam(critic, config.lr_discriminator, config)
        if path.exists():
            state = torch.load(path, weights_only=True)
            critic.load_state_dict(state["critic"])
            optimizer.load_state_dict(state["optimizer"])
            last = state["last_release"]
            return cls(path, critic, optimizer, PrivacyRecord.from_dict(state["plan"]), tuple(last) if last else None)
        # The paper's warm start, on this party's data only, against a throwaway local generator.
        throwaway = new_generator(config, num_classes, seed=request.split_seed * 1_000_003 + 500_009)
        local_gan_iterations(
            throwaway, critic, data, config.pretrain_iterations, config,
            adam(throwaway, config.lr_generator, config), optimizer, secret.sampling,
        )  # fmt: skip
        party = cls(path, critic, optimizer, plan_privacy(request))
        party.save()
        return party

    def save(self) -> None:
        state = {
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plan": self.plan.to_dict(),
            "last_release": list(self.last_release) if self.last_release else None,
        }
        save_atomically(state, self.path)

    def sanitised_gradients(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        data: PartyData,
        config: FedGANConfig,
        secret: SecretRandomness,
    ) -> torch.Tensor:
        """Train the critic on the samples, then their gradients, clipped and noised: one Gaussian release."""
        for _ in range(config.critic_iterations):
            real = data.batch_like(labels, secret.sampling)
            critic_step(
                self.critic, self.optimizer, real, images, labels, secret.sampling,
                gp_weight=config.gp_weight, drift_weight=config.drift_weight,
            )  # fmt: skip
        gradients = generator_loss_gradients(self.critic, images, labels)
        if math.isinf(self.plan.epsilon):  # eps = inf: a trusted coordinator's non-private reference
            return gradients
        noise_std = self.plan.noise_multiplier * step_sensitivity(config.max_grad_norm, len(labels))
        return sanitise(gradients, config.max_grad_norm, noise_std, secret.noise, sample_rate=self.plan.sample_rate)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def answer_samples(
    request: RoundRequest,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    party_folder: Path,
    policy: PartyPolicy,
    data_dir: str | None = None,
    secret: SecretRandomness | None = None,
) -> GradientReply:
    """A fed-gswgan round on the party whose folder is ``party_folder``: ``secret`` defaults to fresh OS entropy."""
    who, what = f"party {request.partition}", f"fed-gswgan round {request.round} of run {request.run_id!r}"
    if not RUN_ID.fullmatch(request.run_id):  # it names a folder of the party's: no paths
        raise Refused(f"{who} refuses {what}: a run id is letters, digits, '.', '_' and '-'")
    policy.check_request(
        who, what, method="fed-gswgan", private=True, epsilon=request.epsilon, delta=request.delta,
        dataset=request.dataset,
    )  # fmt: skip
    data = load_party_data(request, policy, data_dir)
    missing = set(labels.tolist()) - set(data.labels.unique().tolist())
    if missing:  # which classes a party holds is public (the split is); checked before anything is spent
        raise Refused(f"{who} refuses {what}: it holds no examples of classes {sorted(missing)}")
    secret = secret or SecretRandomness.fresh()
    path = Path(party_folder) / "runs" / request.run_id / "fed-gswgan-critic.pt"
    ledger = Ledger(party_folder, request.dataset, who)
    with exclusive_lock(path):  # one request of a run at a time
        if not path.exists():  # a new run: its whole plan must fit before the warm start reads any data
            ledger.check(plan_privacy(request), policy, method="fed-gswgan", purpose=what)
        party = PartyCritic.open(request, data, path, secret)
        images, labels = images.float(), labels.long()
        digest = samples_digest(images, labels)
        run = f"fed-gswgan:{request.run_id}"
        made = ledger.releases(run)
        if party.last_release is not None and party.last_release[:2] == (request.round, digest):
            return GradientReply(party.last_release[2], party.plan, made)  # already released
        if made >= party.plan.steps:
            raise BudgetSpent(
                f"{who} refuses {what}: the run's plan is spent, {made} of {party.plan.steps} planned releases "
                f"made (epsilon {party.plan.epsilon:.3g}, delta {party.plan.delta:g})"
            )
        with ledger.release(round_record(party.plan), policy, method="fed-gswgan", purpose=what, run=run):
            gradients = party.sanitised_gradients(images, labels, data, request.config, secret)
        # Kept for a re-sent round only once the ledger counts it: a party killed before the mark leaves an
        # abandoned (uncounted) entry, and a stored reply must never leave later at no cost.
        party.last_release = (request.round, digest, gradients.detach())
        party.save()
        return GradientReply(gradients, party.plan, made + 1)


# ----- fedavg-gan ------------------------------------------------------------------------------


def answer_models(
    request: RoundRequest,
    generator_state: dict[str, torch.Tensor],
    critic_state: dict[str, torch.Tensor],
    *,
    party_folder: Path,
    policy: PartyPolicy,
    data_dir: str | None = None,
    secret: SecretRandomness | None = None,
) -> ModelReply:
    """A fedavg-gan round: local GAN training from the received parameters (only for a trusted coordinator)."""
    who, what = f"party {request.partition}", f"fedavg-gan round {request.round} of run {request.run_id!r}"
    policy.check_request(
        who, what, method="fedavg-gan", private=False, epsilon=math.inf, delta=request.delta, dataset=request.dataset
    )
    data = load_party_data(request, policy, data_dir)
    privacy = PrivacyRecord(
        epsilon=math.inf,
        delta=request.delta,
        noise_multiplier=0.0,
        steps=1,
        sample_rate=1.0,
        accountant=request.config.accountant,
        mechanism=NON_PRIVATE,
        adjacency="user-level",
    )
    secret = secret or SecretRandomness.fresh()
    config = request.config
    num_classes = dataset_spec(request.dataset).num_classes
    generator, critic = new_generator(config, num_classes, 0), new_critic(config, num_classes, 0)
    generator.load_state_dict(generator_state)
    critic.load_state_dict(critic_state)
    ledger = Ledger(party_folder, request.dataset, who)
    with ledger.release(privacy, policy, method="fedavg-gan", purpose=what, run=f"fedavg-gan:{request.run_id}"):
        local_gan_iterations(
            generator, critic, data, config.local_steps, config, adam(generator, config.lr_generator, config),
            adam(critic, config.lr_discriminator, config), secret.sampling,
        )  # fmt: skip
    return ModelReply(generator.state_dict(), critic.state_dict(), privacy, releases=1)
