"""The coordinator of a federated GAN scenario, independent of Flower.

``FedGANRun.run(parties)`` trains one conditional generator per method, round by round:

    for round r (resuming after the last checkpointed round):
        ask the next parties_per_round parties (cyclic order: equal participation)
        fed-gswgan: send each B generated samples of its classes; step the generator on the
                    mean of the sanitised gradients that come back
        fedavg-gan: send each the generator and critic; average what comes back
        measure every request and reply as serialised Flower messages (bytes)
        checkpoint (generator, optimiser, public random state, rows) atomically
        every eval_every rounds and at the end: sample samples_per_class images per class,
        save a grid, train classifiers on them and test on the real test set

A party that fails or is out of budget is left out of that round (logged); a round none of
whose parties answer is re-sent, and after ``round_retries`` the run stops with everything up to
the last round on disk. Outputs: results.csv (evaluations), rounds.csv (bytes and parties per
round), privacy.json (each party's accountant record), summary.json, accuracy.png, report.md,
grids/, checkpoints/, run.log, DONE.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from flwr.app import RecordDict

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.data.synthetic import save_grid
from fedpsg.federated_gan.config import FedGANSettings, round_parties
from fedpsg.federated_gan.protocol import (
    RoundRequest,
    decode_gradient_reply,
    decode_model_reply,
    encode_model_request,
    encode_sample_request,
    message_bytes,
)
from fedpsg.federated_gan.split import party_classes
from fedpsg.io.files import save_atomically, write_csv, write_json, write_text_atomically
from fedpsg.io.progress import Progress
from fedpsg.nn.evaluation import evaluate_training_set
from fedpsg.nn.gan import adam, new_critic, new_generator, sample_generator, update_average
from fedpsg.runs.folder import PartyError, PartyUnavailable, RunFolder
from fedpsg.runs.results import XAxis, markdown_report, plot_accuracy, write_summary
from fedpsg.runs.retry import send_with_retries

log = logging.getLogger("fedpsg.federated_gan")

MESSAGE_TYPES = {"fed-gswgan": "train.fed_gswgan", "fedavg-gan": "train.fedavg_gan"}


class FedGANParties(Protocol):
    """How the coordinator reaches the parties (Flower's Grid in ``server/app.py``)."""

    def discover(self, partitions: list[int], timeout: float) -> None: ...

    def exchange(
        self, requests: Mapping[int, RecordDict], message_type: str, group: str, timeout: float
    ) -> dict[int, RecordDict | PartyError]:
        """Send every request at once; each partition's reply content, or the error it met."""


class GeneratorTrainer:
    """fed-gswgan's server side: the generator, its moving average, optimiser and public randomness."""

    def __init__(self, settings: FedGANSettings, num_classes: int) -> None:
        config = settings.config
        self.config, self.settings = config, settings
        self.generator = new_generator(config, num_classes, settings.seed)
        self.average = copy.deepcopy(self.generator).requires_grad_(False)
        self.optimizer = adam(self.generator, config.lr_generator, config)
        self.public = torch.Generator().manual_seed(settings.seed)  # codes and labels: public
        self.classes = party_classes(settings.num_partitions, num_classes, settings.scenario.split)
        self.steps = 0
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def requests(self, base: dict[int, RoundRequest]) -> dict[int, RecordDict]:
        """B fresh samples of its own classes for every asked party (kept attached for the step)."""
        self._pending = {}
        contents = {}
        for partition, request in base.items():
            classes = torch.tensor(self.classes[partition])
            labels = classes[torch.randint(len(classes), (self.config.batch_size,), generator=self.public)]
            codes = torch.randn(len(labels), self.config.latent_dim, generator=self.public)
            images = self.generator(codes, labels)
            self._pending[partition] = (images, labels)
            contents[partition] = encode_sample_request(request, images, labels)
        return contents

    def apply(self, replies: dict[int, RecordDict]) -> dict[int, dict]:
        """One generator step on the mean over every answered sample of its sanitised gradient."""
        decoded = {p: decode_gradient_reply(content) for p, content in replies.items()}
        total = sum(len(self._pending[p][1]) for p in decoded)
        self.optimizer.zero_grad(set_to_none=True)
        for partition, reply in decoded.items():
            images = self._pending[partition][0]
            if reply.gradients.shape != images.shape:
                raise PartyError(f"partition {partition} sent gradients of shape {tuple(reply.gradients.shape)}")
            images.backward(reply.gradients / total, retain_graph=False)
        self.optimizer.step()
        self.steps += 1
        update_average(self.average, self.generator, min(self.config.ema_decay, self.steps / (self.steps + 1)))
        self._pending = {}
        return {p: {**r.privacy.to_dict(), "releases": r.releases} for p, r in decoded.items()}

    def sampler(self) -> torch.nn.Module:
        return self.average

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "average": self.average.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "public": self.public.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.average.load_state_dict(state["average"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.public.set_state(state["public"])
        self.steps = int(state["steps"])


class FedAvgTrainer:
    """fedavg-gan's server side: the global generator and critic, averaged over the parties' copies."""

    def __init__(self, settings: FedGANSettings, num_classes: int) -> None:
        self.generator = new_generator(settings.config, num_classes, settings.seed)
        self.critic = new_critic(settings.config, num_classes, settings.seed + 1)

    def requests(self, base: dict[int, RoundRequest]) -> dict[int, RecordDict]:
        generator, critic = self.generator.state_dict(), self.critic.state_dict()
        return {p: encode_model_request(request, generator, critic) for p, request in base.items()}

    def apply(self, replies: dict[int, RecordDict]) -> dict[int, dict]:
        decoded = {p: decode_model_reply(content) for p, content in replies.items()}
        for net, key in ((self.generator, "generator"), (self.critic, "critic")):
            states = [getattr(reply, key) for reply in decoded.values()]
            net.load_state_dict({name: torch.stack([s[name].float() for s in states]).mean(0) for name in states[0]})
        return {p: {**r.privacy.to_dict(), "releases": r.releases} for p, r in decoded.items()}

    def sampler(self) -> torch.nn.Module:
        return self.generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "critic": self.critic.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.critic.load_state_dict(state["critic"])


TRAINERS = {"fed-gswgan": GeneratorTrainer, "fedavg-gan": FedAvgTrainer}


@dataclass
class MethodState:
    """What a method's checkpoint holds besides the trainer: where it is, and what it has measured."""

    next_round: int = 0
    rounds: list[dict] = field(default_factory=list)  # one row per round: parties and bytes
    evaluations: list[dict] = field(default_factory=list)  # one row per evaluation
    privacy: dict[str, dict] = field(default_factory=dict)  # partition -> last accountant record received
    seconds: float = 0.0
    total_bytes: int = 0  # every request and reply so far, all parties


class FedGANRun:
    def __init__(self, settings: FedGANSettings, test: ImageSet | None = None) -> None:
        self.settings = settings
        self.spec = dataset_spec(settings.scenario.dataset)
        self.test = test if test is not None else load_images(self.spec.name, train=False, data_dir=settings.data_dir)
        self.out = settings.out
        self.folder = RunFolder(self.out, settings.identity())
        self.folder.open()

    def _checkpoint_path(self, method: str) -> Path:
        return self.out / "checkpoints" / f"{method}.pt"

    def run(self, parties: FedGANParties) -> pd.DataFrame:
        """Every method's rounds; returns the evaluation rows. Writes DONE when complete."""
        with self.folder.running():
            parties.discover(list(range(self.settings.num_partitions)), self.settings.round_timeout)
            for method in self.settings.methods:
                self.run_method(parties, method)
            frame = self.write_outputs()
            print(frame.to_string(index=False), flush=True)
            return frame

    def run_method(self, parties: FedGANParties, method: str) -> None:
        settings, config = self.settings, self.settings.config
        trainer = TRAINERS[method](settings, self.spec.num_classes)
        state = MethodState()
        path = self._checkpoint_path(method)
        if path.exists():
            saved = torch.load(path, weights_only=False)
            trainer.load_state_dict(saved["trainer"])
            state = saved["state"]
            log.info("%s: resuming after round %d of %d", method, state.next_round, config.rounds)
        if state.next_round >= config.rounds:
            return
        log.info(
            "%s: %d rounds, %d of %d parties per round (%s split)",
            method, config.rounds, settings.parties_per_round, settings.num_partitions, settings.scenario.split,
        )  # fmt: skip
        progress = Progress(f"{method} rounds", config.rounds - state.next_round, interval=15.0)
        for round_index in range(state.next_round, config.rounds):
            started = time.perf_counter()
            self._round(parties, method, trainer, state, round_index)
            state.seconds += time.perf_counter() - started
            state.next_round = round_index + 1
            last = state.next_round == config.rounds
            if state.next_round % config.eval_every == 0 or last:
                state.evaluations.append(self._evaluate(method, trainer, state))
            save_atomically({"trainer": trainer.state_dict(), "state": state}, path)
            progress.step()

    def _round(self, parties: FedGANParties, method: str, trainer, state: MethodState, round_index: int) -> None:
        settings = self.settings
        asked = round_parties(round_index, settings.parties_per_round, settings.num_partitions)
        base = {p: self._request(round_index, p) for p in asked}
        what = f"{method} round {round_index + 1}"

        def exchange() -> tuple[dict[int, RecordDict], dict[int, RecordDict]]:
            """The round's requests (fresh samples on each try) and the replies; the round goes on
            without the parties that fail, and is re-sent only if none answers."""
            contents = trainer.requests(base)
            results = parties.exchange(
                contents, MESSAGE_TYPES[method], f"{method}-round-{round_index}", settings.round_timeout
            )
            replies = {p: r for p, r in results.items() if isinstance(r, RecordDict)}
            for partition, error in results.items():
                if not isinstance(error, RecordDict):
                    log.warning("%s: partition %d left out: %s", what, partition, error)
            if not replies:
                raise PartyUnavailable(f"{what}: no party answered")
            return contents, replies

        contents, replies = send_with_retries(
            exchange, lambda: parties.discover(asked, settings.round_timeout), settings.round_retries, what
        )
        state.privacy.update({str(p): record for p, record in trainer.apply(replies).items()})
        down = sum(message_bytes(contents[p]) for p in asked)
        up = sum(message_bytes(c) for c in replies.values())
        state.total_bytes += down + up
        state.rounds.append(
            {
                "method": method,
                "round": round_index + 1,
                "parties_asked": len(asked),
                "parties_answered": len(replies),
                "bytes_down_per_party": down / len(asked),
                "bytes_up_per_party": up / len(replies),
            }
        )

    def _request(self, round_index: int, partition: int) -> RoundRequest:
        settings = self.settings
        return RoundRequest(
            run_id=settings.run_id(),
            round=round_index,
            partition=partition,
            dataset=self.spec.name,
            num_parties=settings.num_partitions,
            split=settings.scenario.split,
            split_seed=settings.seed,
            epsilon=settings.epsilon,
            delta=settings.delta,
            config=settings.config,
        )

    def _evaluate(self, method: str, trainer, state: MethodState) -> dict:
        settings, config = self.settings, self.settings.config
        pixels, labels = sample_generator(trainer.sampler(), config.samples_per_class, seed=settings.seed + 2)
        generated = ImageSet(self.spec.normalise(pixels).float(), labels.long())
        save_grid(
            generated.images,
            generated.labels,
            self.spec.name,
            self.out / "grids" / f"{method}-round{state.next_round}.png",
            max_per_class=10,
        )
        result = evaluate_training_set(generated, self.test, self.spec, settings.evaluation, seed=settings.seed)
        epsilons = [record["epsilon"] for record in state.privacy.values()]
        recent = pd.DataFrame(state.rounds[-min(len(state.rounds), config.eval_every) :])
        row = {
            "method": method,
            "round": state.next_round,
            "accuracy": result.mean,
            "accuracy_std": result.std,
            "epsilon": max(epsilons) if epsilons else math.nan,
            "bytes_down_per_party": float(recent["bytes_down_per_party"].mean()),
            "bytes_up_per_party": float(recent["bytes_up_per_party"].mean()),
            "bytes_total": state.total_bytes,
            "seconds": round(state.seconds, 1),
        }
        log.info(
            "%s round %d: %.2f%% on real test images, eps per party %s, %.3g bytes up per party per round",
            method, state.next_round, 100 * result.mean, row["epsilon"], row["bytes_up_per_party"],
        )  # fmt: skip
        return row

    def write_outputs(self) -> pd.DataFrame:
        """results.csv, rounds.csv, privacy.json, summary.json, report.md and accuracy.png from the checkpoints."""
        states = {}
        for method in self.settings.methods:
            path = self._checkpoint_path(method)
            if path.exists():
                states[method] = torch.load(path, weights_only=False)["state"]
        evaluations = pd.DataFrame([row for s in states.values() for row in s.evaluations])
        rounds = pd.DataFrame([row for s in states.values() for row in s.rounds])
        write_csv(self.out / "results.csv", evaluations)
        write_csv(self.out / "rounds.csv", rounds)
        privacy = {m: s.privacy for m, s in states.items()}
        write_json(self.out / "privacy.json", privacy)
        final = evaluations.groupby("method").last() if len(evaluations) else pd.DataFrame()
        extra = {
            "final": {
                m: {k: getattr(v, "item", lambda v=v: v)() for k, v in row.items()} for m, row in final.iterrows()
            },
            "bytes_per_round_per_party": {
                m: {"down": float(g["bytes_down_per_party"].mean()), "up": float(g["bytes_up_per_party"].mean())}
                for m, g in rounds.groupby("method")
            }
            if len(rounds)
            else {},
            "wall_seconds": {m: round(s.seconds, 1) for m, s in states.items()},
        }
        write_summary(evaluations, self.out, "round", self.settings.identity(), extra)
        title = self.settings.title
        write_text_atomically(self.out / "report.md", markdown_report(title, evaluations))
        if len(evaluations):
            axes = [XAxis("round", "round"), XAxis("bytes_total", "bytes exchanged so far, all parties", log=True)]
            plot_accuracy(
                evaluations,
                self.out / "accuracy.png",
                title,
                axes,
                "accuracy on real test images (%)",
                self.settings.method_labels,
            )
        return evaluations
