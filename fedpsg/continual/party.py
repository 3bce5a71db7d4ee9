"""A party's side of a stage, independent of Flower: load only its own data, run the method,
and build the reply, which holds only DP outputs (the release, the model, the privacy record).

The party decides what it spends: its policy (:mod:`fedpsg.budget.policy`) is checked before any
private data is read, and the release is written to its lifetime ledger (:mod:`fedpsg.budget.ledger`)
before it is computed. The coordinator's request only proposes.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from fedpsg.budget.charge import charged_run
from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy
from fedpsg.continual.protocol import TrainRequest
from fedpsg.data.datasets import ImageSet, dataset_spec, load_split
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import PartyStage, Release, get_method
from fedpsg.nn.evaluation import EvalConfig, new_classifier
from fedpsg.runs.settings import config_from_hyperparameters


def run_stage(
    request: TrainRequest,
    partition: int,
    *,
    party_folder: Path,
    policy: PartyPolicy,
    data_dir: str | None = None,
    device: str = "cpu",
    secret: SecretRandomness | None = None,
    progress_interval: float = 10.0,
) -> Release:
    """Answer ``request`` as the party holding ``partition``, whose folder holds its lifetime ledgers.

    ``secret`` defaults to fresh OS entropy.
    """
    if request.partition != partition:
        raise ValueError(f"request for partition {request.partition} reached the party holding {partition}")
    who, what = f"party {partition}", f"{request.method} stage {request.stage}"
    method = get_method(request.method)
    policy.check_request(
        who, what, method=method.name, private=True, epsilon=request.epsilon, delta=request.delta,
        dataset=request.dataset,
    )  # fmt: skip
    policy.check_classes(who, what, request.classes)
    config = config_from_hyperparameters(method.config_class, request.hyperparameters)
    spec = dataset_spec(request.dataset)
    data = load_split(
        request.dataset, "private", validation_per_class=request.validation_per_class, data_dir=data_dir
    ).only_classes(request.classes)
    label = f"[{who}] {what}"
    threads = f"{torch.get_num_threads()} thread(s) at nice {os.nice(0)}"
    print(f"{label}: {len(data)} private images of classes {request.classes}; {threads}", flush=True)
    model = new_classifier(spec, EvalConfig(**request.architecture))
    model.load_state_dict(request.model_state)
    stage = PartyStage(
        data=data,
        classes=list(request.classes),
        spec=spec,
        epsilon=request.epsilon,
        delta=request.delta,
        seed=request.seed,
        model=model,
        device=device,
        label=label,
        progress_interval=progress_interval,
        earlier=ImageSet(*request.earlier) if request.earlier is not None else None,
        data_dir=data_dir,
    )
    ledger = Ledger(party_folder, request.dataset, who)
    release = charged_run(method, stage, config, ledger, policy, f"{what} (classes {request.classes})", secret)
    if method.releases == "synthetic":  # it never trains the model on private data: it goes back as it came
        release = replace(release, model_state=request.model_state)
    return release
