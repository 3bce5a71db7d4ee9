"""The messages between coordinator and parties, as Flower RecordDicts.

A train request carries the stage's public settings and the coordinator's current model.
A party's reply carries exactly three records, all of them DP outputs or public:
``synthetic`` (the DP set: images + labels; absent for methods that release only a model),
``model`` (the model state) and ``privacy`` (the accountant's record): a method's
:class:`~fedpsg.methods.Release`, with the model always present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedpsg.methods import Release
from fedpsg.runs.wire import check_reply_keys, privacy_config, read_privacy

REPLY_KEYS = frozenset({"synthetic", "model", "privacy"})


@dataclass(frozen=True)
class TrainRequest:
    method: str
    stage: int
    partition: int  # which party must answer
    dataset: str
    validation_per_class: int  # the evaluator's hold-out: the party's data is the rest of the training split
    classes: list[int]
    epsilon: float
    delta: float
    seed: int
    hyperparameters: dict  # the method's config dataclass as a dict
    model_state: dict[str, torch.Tensor]
    architecture: dict  # model, width, depth of model_state (fedpsg.nn.evaluation.EvalConfig.architecture)
    # Earlier stages' DP sets of this method (images, labels), for methods that use them: DP
    # releases already, so they may travel with the model.
    earlier: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def where(self) -> str:
        """Names the stage in the coordinator's and the ServerApp's errors."""
        return f"stage {self.stage} ({self.method}, partition {self.partition})"


def encode_train_request(request: TrainRequest) -> RecordDict:
    config = {
        "method": request.method,
        "stage": request.stage,
        "partition": request.partition,
        "dataset": request.dataset,
        "validation_per_class": request.validation_per_class,
        "classes": list(request.classes),
        "epsilon": float(request.epsilon),
        "delta": float(request.delta),
        "seed": request.seed,
    }
    config.update({f"hp.{k}": v for k, v in request.hyperparameters.items() if v is not None})
    config.update({f"arch.{k}": v for k, v in request.architecture.items()})
    records = {"config": ConfigRecord(config), "model": ArrayRecord(request.model_state)}
    if request.earlier is not None:
        images, labels = request.earlier
        records["earlier"] = ArrayRecord({"images": images.detach().cpu(), "labels": labels.cpu()})
    return RecordDict(records)


def decode_train_request(content: RecordDict) -> TrainRequest:
    config = content.config_records["config"]
    return TrainRequest(
        method=str(config["method"]),
        stage=int(config["stage"]),
        partition=int(config["partition"]),
        dataset=str(config["dataset"]),
        validation_per_class=int(config["validation_per_class"]),
        classes=[int(c) for c in config["classes"]],
        epsilon=float(config["epsilon"]),
        delta=float(config["delta"]),
        seed=int(config["seed"]),
        hyperparameters={k[3:]: v for k, v in config.items() if k.startswith("hp.")},
        model_state=content.array_records["model"].to_torch_state_dict(),
        architecture={k[5:]: v for k, v in config.items() if k.startswith("arch.")},
        earlier=_pair(content.array_records.get("earlier")),
    )


def _pair(record: ArrayRecord | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if record is None:
        return None
    arrays = record.to_torch_state_dict()
    return arrays["images"], arrays["labels"]


def encode_reply(reply: Release) -> RecordDict:
    records: dict = {"model": ArrayRecord(reply.model_state), "privacy": privacy_config(reply.privacy)}
    if reply.images is not None:
        records["synthetic"] = ArrayRecord({"images": reply.images.detach().cpu(), "labels": reply.labels.cpu()})
    return RecordDict(records)


def decode_reply(content: RecordDict) -> Release:
    check_reply_keys(content, REPLY_KEYS)
    privacy, _ = read_privacy(content)
    synthetic = content.array_records.get("synthetic")
    arrays = synthetic.to_torch_state_dict() if synthetic is not None else {}
    return Release(
        privacy=privacy,
        model_state=content.array_records["model"].to_torch_state_dict(),
        images=arrays.get("images"),
        labels=arrays.get("labels"),
    )
