"""The coordinator's side of the continual-learning run, independent of Flower.

It keeps every DP set it receives (on disk, as soon as it arrives), replays the union of the
sets received so far to train a classifier, evaluates it on the real test images of all
classes seen so far, and writes the results. A run resumes from its output folder: finished
stages are loaded, not redone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from fedpsg.data import ImageSet, dataset_spec
from fedpsg.evaluation import Evaluation, accuracy_by_group, evaluate_training_set, new_classifier, train_classifier
from fedpsg.protocol import StageReply
from fedpsg.results import write_results, write_summary
from fedpsg.settings import RunSettings
from fedpsg.synthetic import SyntheticSet, save_grid

log = logging.getLogger("fedpsg.coordinator")


class ResumeMismatchError(RuntimeError):
    """The output folder holds a run with different settings."""


def _identity(settings: RunSettings) -> dict:
    return json.loads(json.dumps(settings.to_dict(), default=str))


def check_resumable(settings: RunSettings) -> bool:
    """True if ``settings.out`` holds a run to resume; raise if it holds a different run."""
    config_path = settings.out / "config.json"
    if not config_path.exists():
        return False
    found, wanted = json.loads(config_path.read_text()), _identity(settings)
    if found != wanted:
        changed = sorted(k for k in wanted if found.get(k) != wanted.get(k))
        raise ResumeMismatchError(
            f"{settings.out} holds a run with different settings ({', '.join(changed)}); use another --out or delete it"
        )
    return True


class Coordinator:
    def __init__(self, settings: RunSettings, test: ImageSet) -> None:
        self.settings = settings
        self.spec = dataset_spec(settings.scenario.dataset)
        self.test = test
        self.out = settings.out
        self._check_or_write_config()

    # ----- output layout -------------------------------------------------------------------
    def _set_path(self, method: str, stage: int) -> Path:
        return self.out / "sets" / method / f"stage{stage}.pt"

    def _model_path(self, method: str, stage: int) -> Path:
        return self.out / "models" / method / f"stage{stage}.pt"

    def _receipt_path(self, method: str, stage: int) -> Path:
        return self.out / "sets" / method / f"stage{stage}.receipt.json"

    def _row_path(self, method: str, stage: int) -> Path:
        return self.out / "stages" / f"{method}-stage{stage}.json"

    def _check_or_write_config(self) -> None:
        if check_resumable(self.settings):
            log.info("resuming the run in %s", self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(_identity(self.settings), indent=2))

    # ----- stage bookkeeping --------------------------------------------------------------------
    def is_done(self, method: str, stage: int) -> bool:
        return self._row_path(method, stage).exists()

    def received_set(self, method: str, stage: int) -> bool:
        """Whether the party's reply for this stage is already stored (written last on receipt)."""
        return self._receipt_path(method, stage).exists()

    def architecture(self, method: str) -> dict:
        config = self.settings.profile.evaluation_for(method)
        return {"model": config.model, "width": config.width, "depth": config.depth}

    def current_model_state(self, method: str, stage: int) -> dict[str, torch.Tensor]:
        """The model to send to the party of ``stage`` (the previous stage's result, else a fresh one)."""
        if stage > 1 and self._model_path(method, stage - 1).exists():
            return torch.load(self._model_path(method, stage - 1), weights_only=True)
        return new_classifier(self.spec, self.settings.profile.evaluation_for(method), self.settings.seed).state_dict()

    def rows(self) -> list[dict]:
        paths = sorted((self.out / "stages").glob("*.json"))
        return [json.loads(p.read_text(), parse_constant=float) for p in paths]

    # ----- receiving and evaluating ---------------------------------------------------------------
    def accept(self, method: str, stage: int, classes: list[int], reply: StageReply, party_seconds: float) -> dict:
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
        self._receipt_path(method, stage).parent.mkdir(parents=True, exist_ok=True)
        self._receipt_path(method, stage).write_text(json.dumps(receipt, indent=2))
        return self.evaluate_stage(method, stage, party_seconds, reply.privacy.to_dict())

    def resume_stage(self, method: str, stage: int) -> dict:
        """Evaluate a stage whose reply was stored before the run was interrupted."""
        receipt = json.loads(self._receipt_path(method, stage).read_text(), parse_constant=float)
        return self.evaluate_stage(method, stage, receipt["party_seconds"], receipt["privacy"])

    def _validate_reply(self, method: str, stage: int, classes: list[int], reply: StageReply) -> None:
        eps = self.settings.epsilon
        if not math.isinf(eps) and not (reply.privacy.epsilon <= eps * (1 + 1e-6)):
            raise ValueError(f"stage {stage}: party spent epsilon={reply.privacy.epsilon}, budget is {eps}")
        if (reply.images is None) != (method == "dpsgd"):
            raise ValueError(f"stage {stage}: a {method} party must {'not ' if method == 'dpsgd' else ''}send a set")
        if reply.images is not None and not set(reply.labels.unique().tolist()) <= set(classes):
            raise ValueError(f"stage {stage}: synthetic labels outside the party's classes {classes}")

    def _save_model(self, method: str, stage: int, state: dict[str, torch.Tensor]) -> None:
        path = self._model_path(method, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(path)

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
            model = new_classifier(self.spec, settings.profile.evaluation_for(method))
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
            "party_seconds": round(party_seconds, 2),
            "eval_seconds": round(time.perf_counter() - started, 2),
        }
        path = self._row_path(method, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2))
        log.info("%s stage %d: accuracy over seen classes %.2f%%", method, stage, 100 * evaluation.mean)
        self.write_outputs()
        return row

    def _replay(
        self, method: str, stage: int, test: ImageSet, groups: list[list[int]]
    ) -> tuple[Evaluation, dict[str, torch.Tensor]]:
        settings = self.settings
        union = self.replay_set(method, stage)
        config = settings.profile.evaluation_for(method)
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
        eps = self.settings.epsilon
        title = f"{self.settings.scenario.name}: ε={'∞' if math.isinf(eps) else f'{eps:g}'}, δ={self.settings.delta:g}"
        frame = write_results(rows, self.out, title)
        write_summary(frame, self.out, self.settings.to_dict(), {"profile": self.settings.profile.name})
        for method in self.settings.methods:
            sets = [self._set_path(method, k) for k in range(1, len(self.settings.stages) + 1)]
            sets = [SyntheticSet.load(p) for p in sets if p.exists()]
            if sets:
                images = torch.cat([s.images for s in sets])
                labels = torch.cat([s.labels for s in sets])
                save_grid(images, labels, self.spec.name, self.out / "grids" / f"{method}-all.png")
