"""The coordinator's side of the continual-learning run, independent of Flower.

``Coordinator.run(parties)`` is the whole run: it finds the parties, starts every (method,
stage) as soon as its inputs exist and its party is free (``fedpsg.continual.schedule``: several
requests in flight, up to ``parties.capacity``), re-sends a stage whose party vanished (bounded),
keeps every DP release on disk as soon as it arrives, and, as a job of its own beside the
parties' work, replays the union of the sets received so far to train a classifier, evaluates
it on the real test images of all classes seen so far, and writes the results. A run resumes
from its output folder: finished stages are loaded, not redone. ``parties`` is anything with
``discover``, ``send`` and ``capacity``: Flower's Grid in the ServerApp (``server/app.py``), or
parties in this process (``fedpsg.continual.local``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd
import torch

from fedpsg.continual.protocol import TrainRequest
from fedpsg.continual.schedule import Job, StageGraph
from fedpsg.continual.timeline import plot_timeline, read_timeline, timeline_summary
from fedpsg.data.datasets import ImageSet, dataset_spec, load_images, load_split
from fedpsg.data.synthetic import SyntheticSet, save_grid
from fedpsg.io.files import save_atomically, write_json
from fedpsg.methods import Release, get_method
from fedpsg.nn.evaluation import (
    REAL_CLASSIFIERS,
    Evaluation,
    accuracy_by_group,
    evaluate_training_set,
    new_classifier,
    real_classifiers,
    reversed_utility,
    train_classifier,
)
from fedpsg.runs.folder import RunFolder, in_run_context
from fedpsg.runs.results import accuracy_table, write_results, write_summary
from fedpsg.runs.retry import send_with_retries
from fedpsg.runs.settings import RunSettings, format_epsilon

log = logging.getLogger("fedpsg.continual.coordinator")
TIMELINE_FILE = "timeline.csv"
T = TypeVar("T")


def timed(function: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """``function(*args)`` with its wall-clock start and end (run in a job's own thread)."""
    started = time.time()
    result = function(*args)
    return result, started, time.time()


class Parties(Protocol):
    """How the coordinator reaches the parties (Flower's Grid, or in-process parties)."""

    def discover(self, partitions: list[int], timeout: float) -> None:
        """Find the nodes holding ``partitions`` (again, after one vanished); raise PartyUnavailable."""

    capacity: int  # how many requests may be in flight at once (each to another party)
    slots: threading.BoundedSemaphore  # held by each request in flight, by every coordinator using these parties
    # The parties compute on the coordinator's own cores (a simulation on one machine): an
    # evaluation then holds a slot too, so that the jobs never ask for more threads than there are.
    evaluations_share_slots: bool

    def send(self, request: TrainRequest, timeout: float) -> Release:
        """Run one stage on ``request.partition``; raise PartyUnavailable / PartyError. Called from
        up to ``capacity`` threads at once."""


class Coordinator:
    def __init__(self, settings: RunSettings, test: ImageSet | None = None) -> None:
        self.settings = settings
        self.spec = dataset_spec(settings.scenario.dataset)
        self.test = test if test is not None else load_images(self.spec.name, train=False, data_dir=settings.data_dir)
        self.out = settings.out
        self._judges: dict[int, list[torch.nn.Module]] = {}  # real2gen's classifiers per stage (seen classes)
        self._validation: ImageSet | None = None  # the evaluator's validation split, loaded once for them
        self._judging = threading.Lock()
        self._writing = threading.Lock()  # evaluations finishing at once write the run's outputs one at a time
        self.folder = RunFolder(self.out, settings.identity())
        if self.folder.open():
            log.info("resuming the run in %s", self.out)

    # ----- the run ----------------------------------------------------------------------------
    def run(self, parties: Parties) -> list[dict]:
        """Every method's stages as a job graph (fedpsg.continual.schedule); returns the result rows.

        Party jobs run in up to ``parties.capacity`` threads, each a blocking ``send`` with its
        retries. Evaluations run in threads of their own beside them: where they share the parties'
        slots (a simulation on these cores) as many as there are slots, so that no core idles while
        evaluations queue; else one, with every core of the coordinator's machine. On a party's
        failure no new job starts, the jobs in flight finish and are kept, and the error is raised.
        """
        settings = self.settings
        graph = StageGraph(
            list(settings.methods),
            len(settings.stages),
            capacity=parties.capacity,
            continue_replay=settings.replay == "continue",
        )
        with self.folder.running():
            for job in graph.jobs:
                if self.is_done(*job):
                    graph.received.add(job)
                    graph.evaluated.add(job)
                    log.info("%s stage %d/%d already done: skipped", *job, graph.num_stages)
                elif self.received_set(*job):  # reply stored, evaluation interrupted
                    graph.received.add(job)
            parties.discover(
                [settings.partition(k) for k in range(1, settings.num_partitions + 1)], settings.reconnect_timeout
            )
            with (
                ThreadPoolExecutor(graph.capacity, thread_name_prefix="party") as party_pool,
                ThreadPoolExecutor(
                    graph.capacity if parties.evaluations_share_slots else 1, thread_name_prefix="evaluation"
                ) as evaluation_pool,
            ):
                failure = self._run_graph(graph, parties, party_pool, evaluation_pool)
            self.write_timeline(complete=failure is None)
            if failure is not None:  # e.g. a party refused: what was released so far stays on disk
                log.error("%s; the finished stages are kept in %s (re-run with it to resume)", failure, self.out)
                raise failure
            rows = self.rows()
            if rows:
                print(accuracy_table(pd.DataFrame(rows)).to_string(), flush=True)
            return rows

    def _run_graph(
        self, graph: StageGraph, parties: Parties, party_pool: ThreadPoolExecutor, evaluation_pool: ThreadPoolExecutor
    ) -> BaseException | None:
        """Start every job whose inputs exist until the graph is done or a job fails (returned)."""
        in_flight: dict[Future, tuple[str, Job]] = {}
        failure: BaseException | None = None
        failed_evaluations: set[Job] = set()
        while True:
            if failure is None:
                for job in graph.party_ready():
                    graph.running.add(job)
                    request = self.request(*job)
                    log.info(
                        "%s stage %d/%d: party %d, classes %s",
                        job[0], job[1], graph.num_stages, request.partition, request.classes,
                    )  # fmt: skip
                    future = party_pool.submit(in_run_context(self._party_job), parties, request)
                    in_flight[future] = ("party", job)
            for job in graph.evaluation_ready():  # also after a failure: nothing received is lost
                if job in failed_evaluations:  # not again: it failed once, the run reports why
                    continue
                graph.evaluating.add(job)
                evaluation = evaluation_pool.submit(in_run_context(self._evaluation_job), parties, *job)
                in_flight[evaluation] = ("evaluation", job)
            if not in_flight:
                return failure if failure is not None or graph.finished() else RuntimeError("the job graph is stuck")
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                kind, job = in_flight.pop(future)
                (graph.running if kind == "party" else graph.evaluating).discard(job)
                try:
                    result, started, ended = future.result()
                    self._record_job(kind, job, started, ended)
                    if kind == "party":
                        self.accept(*job, self.settings.stages[job[1] - 1], result, ended - started)
                        graph.received.add(job)
                    else:
                        graph.evaluated.add(job)
                except Exception as err:  # kept; raised once the jobs in flight are stored
                    failure = failure or err
                    if kind == "evaluation":
                        failed_evaluations.add(job)

    def _record_job(self, kind: str, job: Job, started: float, ended: float) -> None:
        """One line of ``timeline.csv``: what ran when (wall clock), for a Gantt chart of the run."""
        path = self.out / TIMELINE_FILE
        new = not path.exists()
        with path.open("a") as handle:
            if new:
                handle.write("kind,method,stage,partition,start,end,seconds\n")
            method, stage = job
            partition = self.settings.partition(stage)
            handle.write(f"{kind},{method},{stage},{partition},{started:.3f},{ended:.3f},{ended - started:.2f}\n")

    def write_timeline(self, complete: bool) -> None:
        """``timeline.png`` (Gantt chart) and, for a complete run, ``timeline.json`` (critical path, projections)."""
        path = self.out / TIMELINE_FILE
        if not path.exists():
            return
        frame = read_timeline(path)
        plot_timeline(frame, self.out / "timeline.png", f"{self.settings.title}: what ran when")
        if complete:
            summary = timeline_summary(frame, list(self.settings.methods), len(self.settings.stages))
            write_json(self.out / "timeline.json", summary)
            log.info(
                "wall time %.0f s for %.0f s of jobs; critical path %.0f s; projected on 2/8/16/64 cores: %s s",
                summary["measured_wall_seconds"], summary["busy_seconds"], summary["critical_path_seconds"],
                "/".join(f"{v:.0f}" for v in summary["projected_wall_seconds"].values()),
            )  # fmt: skip

    def _party_job(self, parties: Parties, request: TrainRequest) -> tuple[Release, float, float]:
        """The stage's request with its retries, timed from when it holds one of the parties' slots."""
        with parties.slots:
            return timed(self._send, parties, request)

    def _evaluation_job(self, parties: Parties, method: str, stage: int) -> tuple[dict, float, float]:
        """A stage's evaluation, timed from when it may start (holding a slot where the parties share its cores)."""
        with parties.slots if parties.evaluations_share_slots else nullcontext():
            return timed(self._evaluate_received, method, stage)

    def _send(self, parties: Parties, request: TrainRequest) -> Release:
        return send_with_retries(
            lambda: parties.send(request, self.settings.stage_timeout),
            lambda: parties.discover([request.partition], self.settings.reconnect_timeout),
            self.settings.stage_retries,
            request.where,
        )

    def _evaluate_received(self, method: str, stage: int) -> dict:
        """Evaluate a stage whose reply is stored; log it as the stage's end."""
        receipt = json.loads(self._receipt_path(method, stage).read_text(), parse_constant=float)
        row = self.evaluate_stage(method, stage, receipt["party_seconds"], receipt["privacy"])
        log.info(
            "%s stage %d done: %.2f%% over seen classes, party spent eps=%s (%.0f s)",
            method, stage, 100 * row["accuracy"], format_epsilon(row["epsilon"]), row["party_seconds"],
        )  # fmt: skip
        return row

    def request(self, method: str, stage: int) -> TrainRequest:
        settings = self.settings
        earlier = None
        if get_method(method).uses_earlier_sets and stage > 1:
            union = self.replay_set(method, stage - 1)
            earlier = (union.images, union.labels)
        return TrainRequest(
            method=method,
            stage=stage,
            partition=settings.partition(stage),
            dataset=settings.scenario.dataset,
            validation_per_class=settings.scenario.validation_per_class,
            classes=settings.stages[stage - 1],
            epsilon=settings.epsilon,
            delta=settings.delta,
            seed=settings.seed + stage,  # public randomness only: parties draw their DP noise themselves
            hyperparameters=asdict(settings.configs[method]),
            # A method that releases a model finetunes the previous stage's; the others get the
            # run's fresh classifier (they send it back untouched), whatever is evaluated by then.
            model_state=self.current_model_state(method, stage if get_method(method).releases == "model" else 1),
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
        """The model stage ``stage`` starts from: stage - 1's (the party's release, or the classifier its
        evaluation trained), else the run's fresh classifier."""
        if stage > 1 and self._model_path(method, stage - 1).exists():
            return torch.load(self._model_path(method, stage - 1), weights_only=True)
        return new_classifier(self.spec, self.settings.evaluations[method], self.settings.seed).state_dict()

    def rows(self) -> list[dict]:
        paths = sorted((self.out / "stages").glob("*.json"))
        return [json.loads(p.read_text(), parse_constant=float) for p in paths]

    # ----- receiving and evaluating ---------------------------------------------------------------
    def accept(self, method: str, stage: int, classes: list[int], reply: Release, party_seconds: float) -> None:
        """Store a party's reply at once (its receipt last); it is evaluated as its own job."""
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
        real2gen = None
        if self._set_path(method, stage).exists():
            union = self.replay_set(method, stage)
            evaluation, model_state = self._replay(method, stage, union, test, groups)
            self._save_model(method, stage, model_state)
            judges = self._real_classifiers(stage, seen)
            real2gen = reversed_utility(union, judges, settings.device) if judges else None
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
            # Reversed utility of the replayed set; none for a model or without a validation split.
            "real2gen": real2gen.mean if real2gen else None,
            "real2gen_std": real2gen.std if real2gen else None,
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
        log.info("%s stage %d: accuracy over seen classes %.2f%%", method, stage, 100 * evaluation.mean)
        with self._writing:
            write_json(self._row_path(method, stage), row)
            self.write_outputs()
        return row

    def _real_classifiers(self, stage: int, seen: list[int]) -> list[torch.nn.Module]:
        """real2gen's judges at ``stage``: classifiers trained on the evaluator's validation images of
        the seen classes (held by no party), once per stage for every method; none without a
        validation split."""
        settings = self.settings
        if settings.scenario.validation_per_class == 0:
            return []
        with self._judging:
            if stage not in self._judges:
                if self._validation is None:
                    self._validation = load_split(
                        self.spec.name,
                        "validation",
                        validation_per_class=settings.scenario.validation_per_class,
                        data_dir=settings.data_dir,
                    )
                real = self._validation.only_classes(seen)
                config = REAL_CLASSIFIERS[settings.profile]
                self._judges[stage] = real_classifiers(real, self.spec, config, settings.device, settings.seed + stage)
            return self._judges[stage]

    def _replay(
        self, method: str, stage: int, union: ImageSet, test: ImageSet, groups: list[list[int]]
    ) -> tuple[Evaluation, dict[str, torch.Tensor]]:
        settings = self.settings
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
