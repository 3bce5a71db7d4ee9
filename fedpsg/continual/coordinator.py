"""The coordinator's side of the continual-learning run, independent of Flower.

``Coordinator.run(parties)`` is the whole run: it finds the parties, visits the stages in
scenario order for every method, re-sends a stage whose party vanished (bounded), keeps every
DP release on disk as soon as it arrives, replays the union of the sets received so far to
train a classifier, evaluates it on the real test images of all classes seen so far, and
writes the results. A run resumes from its output folder: finished stages are loaded, not
redone. ``parties`` is anything with ``discover`` and ``send``: Flower's Grid in the ServerApp
(``server/app.py``), or parties in this process (``fedpsg.continual.local``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch

from fedpsg.continual.protocol import TrainRequest
from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.data.synthetic import SyntheticSet, save_grid
from fedpsg.io.files import save_atomically, write_json
from fedpsg.methods import Release, get_method
from fedpsg.nn.evaluation import Evaluation, accuracy_by_group, evaluate_training_set, new_classifier, train_classifier
from fedpsg.runs.folder import PartyError, RunFolder
from fedpsg.runs.results import accuracy_table, write_results, write_summary
from fedpsg.runs.retry import send_with_retries
from fedpsg.runs.settings import RunSettings, format_epsilon

log = logging.getLogger("fedpsg.continual.coordinator")


class Parties(Protocol):
    """How the coordinator reaches the parties (Flower's Grid, or in-process parties)."""

    def discover(self, partitions: list[int], timeout: float) -> None:
        """Find the nodes holding ``partitions`` (again, after one vanished); raise PartyUnavailable."""

    def send(self, request: TrainRequest, timeout: float) -> Release:
        """Run one stage on ``request.partition``; raise PartyUnavailable / PartyError."""


class Coordinator:
    def __init__(self, settings: RunSettings, test: ImageSet | None = None) -> None:
        self.settings = settings
        self.spec = dataset_spec(settings.scenario.dataset)
        self.test = test if test is not None else load_images(self.spec.name, train=False, data_dir=settings.data_dir)
        self.out = settings.out
        self.folder = RunFolder(self.out, settings.identity())
        if self.folder.open():
            log.info("resuming the run in %s", self.out)

    # ----- the run ----------------------------------------------------------------------------
    def run(self, parties: Parties) -> list[dict]:
        """Every method's stages in order; returns the result rows. Writes DONE when complete."""
        settings = self.settings
        with self.folder.running():
            parties.discover(list(range(settings.num_partitions)), settings.reconnect_timeout)
            try:
                for method in settings.methods:
                    for stage, classes in enumerate(settings.stages, start=1):
                        self._run_stage(parties, method, stage, classes)
            except PartyError as err:  # e.g. a party refused: what was released so far stays on disk
                log.error("%s; the finished stages are kept in %s (re-run with it to resume)", err, self.out)
                raise
            rows = self.rows()
            if rows:
                print(accuracy_table(pd.DataFrame(rows)).to_string(), flush=True)
            return rows

    def _run_stage(self, parties: Parties, method: str, stage: int, classes: list[int]) -> None:
        total = len(self.settings.stages)
        if self.is_done(method, stage):
            log.info("%s stage %d/%d already done: skipped", method, stage, total)
            return
        partition = stage - 1
        log.info("%s stage %d/%d: party %d, classes %s", method, stage, total, partition, classes)
        started = time.perf_counter()
        if self.received_set(method, stage):  # reply stored, evaluation interrupted
            row = self.resume_stage(method, stage)
        else:
            request = self.request(method, stage)
            reply = send_with_retries(
                lambda: parties.send(request, self.settings.stage_timeout),
                lambda: parties.discover([partition], self.settings.reconnect_timeout),
                self.settings.stage_retries,
                request.where,
            )
            row = self.accept(method, stage, classes, reply, time.perf_counter() - started)
        log.info(
            "%s stage %d done: %.2f%% over seen classes, party spent eps=%s (%.0f s)",
            method, stage, 100 * row["accuracy"], format_epsilon(row["epsilon"]), time.perf_counter() - started,
        )  # fmt: skip

    def request(self, method: str, stage: int) -> TrainRequest:
        settings = self.settings
        earlier = None
        if get_method(method).uses_earlier_sets and stage > 1:
            union = self.replay_set(method, stage - 1)
            earlier = (union.images, union.labels)
        return TrainRequest(
            method=method,
            stage=stage,
            partition=stage - 1,
            dataset=settings.scenario.dataset,
            validation_per_class=settings.scenario.validation_per_class,
            classes=settings.stages[stage - 1],
            epsilon=settings.epsilon,
            delta=settings.delta,
            seed=settings.seed + stage,  # public randomness only: parties draw their DP noise themselves
            hyperparameters=asdict(settings.configs[method]),
            model_state=self.current_model_state(method, stage),
            architecture=settings.evaluations[method].architecture,
            earlier=earlier,
        )

    # ----- output layout -------------------------------------------------------------------
    def _set_path(self, method: str, stage: int) -> Path:
        return self.out / "sets" / method / f"stage{stage}.pt"

    def _model_path(self, method: str, stage: int) -> Path:
        return self.out / "models" / method / f"stage{stage}.pt"

    def _receipt_path(self, method: str, stage: int) -> Path:
        return self.out / "sets" / method / f"stage{stage}.receipt.json"

    def _row_path(self, method: str, stage: int) -> Path:
        return self.out / "stages" / f"{method}-stage{stage}.json"

    # ----- stage bookkeeping --------------------------------------------------------------------
    def is_done(self, method: str, stage: int) -> bool:
        return self._row_path(method, stage).exists()

    def received_set(self, method: str, stage: int) -> bool:
        """Whether the party's reply for this stage is already stored (written last on receipt)."""
        return self._receipt_path(method, stage).exists()

    def current_model_state(self, method: str, stage: int) -> dict[str, torch.Tensor]:
        """The model to send to the party of ``stage`` (the previous stage's result, else a fresh one)."""
        if stage > 1 and self._model_path(method, stage - 1).exists():
            return torch.load(self._model_path(method, stage - 1), weights_only=True)
        return new_classifier(self.spec, self.settings.evaluations[method], self.settings.seed).state_dict()

    def rows(self) -> list[dict]:
        paths = sorted((self.out / "stages").glob("*.json"))
        return [json.loads(p.read_text(), parse_constant=float) for p in paths]

    # ----- receiving and evaluating ---------------------------------------------------------------
    def accept(self, method: str, stage: int, classes: list[int], reply: Release, party_seconds: float) -> dict:
        """Store a party's reply at once, then replay, evaluate and record the stage."""
        self._validate_reply(method, stage, classes, reply)
        if reply.images is not None:
            SyntheticSet(
                reply.images, reply.labels, self.spec.name, classes, reply.privacy, {"method": method, "stage": stage}
            ).save(self._set_path(method, stage))
            save_grid(reply.images, reply.labels, self.spec.name, self.out / "grids" / f"{method}-stage{stage}.png")
        else:
            self._save_model(method, stage, reply.model_state)
        receipt = {"privacy": reply.privacy.to_dict(), "party_seconds": party_seconds}
        write_json(self._receipt_path(method, stage), receipt)
        return self.evaluate_stage(method, stage, party_seconds, reply.privacy.to_dict())

    def resume_stage(self, method: str, stage: int) -> dict:
        """Evaluate a stage whose reply was stored before the run was interrupted."""
        receipt = json.loads(self._receipt_path(method, stage).read_text(), parse_constant=float)
        return self.evaluate_stage(method, stage, receipt["party_seconds"], receipt["privacy"])

    def _validate_reply(self, method: str, stage: int, classes: list[int], reply: Release) -> None:
        eps = self.settings.epsilon
        if not math.isinf(eps) and not (reply.privacy.epsilon <= eps * (1 + 1e-6)):
            raise ValueError(f"stage {stage}: party spent epsilon={reply.privacy.epsilon}, budget is {eps}")
        releases_set = get_method(method).releases == "synthetic"
        if (reply.images is not None) != releases_set:
            raise ValueError(f"stage {stage}: a {method} party must {'' if releases_set else 'not '}send a set")
        if reply.images is not None and not set(reply.labels.unique().tolist()) <= set(classes):
            raise ValueError(f"stage {stage}: synthetic labels outside the party's classes {classes}")

    def _save_model(self, method: str, stage: int, state: dict[str, torch.Tensor]) -> None:
        save_atomically(state, self._model_path(method, stage))

    def replay_set(self, method: str, stage: int) -> ImageSet:
        """Union of the DP sets received from stages 1..stage."""
        sets = [SyntheticSet.load(self._set_path(method, k)) for k in range(1, stage + 1)]
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))

    def evaluate_stage(self, method: str, stage: int, party_seconds: float, privacy: dict) -> dict:
        settings = self.settings
        groups = settings.stages[:stage]
        seen = [c for group in groups for c in group]
        test = self.test.only_classes(seen)
        started = time.perf_counter()
        if self._set_path(method, stage).exists():
            evaluation, model_state = self._replay(method, stage, test, groups)
            self._save_model(method, stage, model_state)
        else:  # the party released a model (DP-SGD): evaluate it as it is
            model = new_classifier(self.spec, settings.evaluations[method])
            model.load_state_dict(torch.load(self._model_path(method, stage), weights_only=True))
            overall, by_group = accuracy_by_group(model, test, groups, settings.device)
            evaluation = Evaluation([overall], [[g] for g in by_group])
        row = {
            "method": method,
            "stage": stage,
            "classes": " ".join(map(str, settings.stages[stage - 1])),
            "accuracy": evaluation.mean,
            "accuracy_std": evaluation.std,
            **{f"acc_stage{k + 1}": acc for k, acc in enumerate(evaluation.per_group_mean)},
            "epsilon": privacy["epsilon"],
            "delta": privacy["delta"],
            "noise_multiplier": privacy["noise_multiplier"],
            "steps": privacy["steps"],
            "sample_rate": privacy["sample_rate"],
            "accountant": privacy["accountant"],
            "adjacency": privacy.get("adjacency"),
            "dataset_size": privacy.get("dataset_size"),
            "party_seconds": round(party_seconds, 2),
            "eval_seconds": round(time.perf_counter() - started, 2),
        }
        write_json(self._row_path(method, stage), row)
        log.info("%s stage %d: accuracy over seen classes %.2f%%", method, stage, 100 * evaluation.mean)
        self.write_outputs()
        return row

    def _replay(
        self, method: str, stage: int, test: ImageSet, groups: list[list[int]]
    ) -> tuple[Evaluation, dict[str, torch.Tensor]]:
        settings = self.settings
        union = self.replay_set(method, stage)
        config = settings.evaluations[method]
        if settings.replay == "fresh":  # the paper's protocol: fresh classifiers on the union
            evaluation = evaluate_training_set(
                union, test, self.spec, config, groups, settings.device, seed=settings.seed + 1000 * stage
            )
            return evaluation, evaluation.model.cpu().state_dict()
        model = new_classifier(self.spec, config)  # continue training the model it holds
        model.load_state_dict(self.current_model_state(method, stage))
        model = train_classifier(union, self.spec, config, settings.device, settings.seed + stage, model=model)
        overall, by_group = accuracy_by_group(model, test, groups, settings.device)
        return Evaluation([overall], [[g] for g in by_group]), model.cpu().state_dict()

    def write_outputs(self) -> None:
        rows = self.rows()
        if not rows:
            return
        frame = write_results(rows, self.out, self.settings.title, self.settings.method_labels)
        extra = {"stages": frame.to_dict(orient="records"), "profile": self.settings.profile}
        write_summary(frame, self.out, "stage", self.settings.identity(), extra)
        for method in self.settings.methods:
            sets = [self._set_path(method, k) for k in range(1, len(self.settings.stages) + 1)]
            sets = [SyntheticSet.load(p) for p in sets if p.exists()]
            if sets:
                images = torch.cat([s.images for s in sets])
                labels = torch.cat([s.labels for s in sets])
                save_grid(images, labels, self.spec.name, self.out / "grids" / f"{method}-all.png")
