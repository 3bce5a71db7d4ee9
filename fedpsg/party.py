"""A party's side of a stage, independent of Flower: load only its own data, run the method,
and build the reply, which holds only DP outputs (the release, the model, the privacy record).

The party decides what it spends: its policy (:mod:`fedpsg.policy`) is checked before any
private data is read, and the release is written to its lifetime ledger (:mod:`fedpsg.ledger`)
before it is computed. The coordinator's request only proposes.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedpsg.data import ImageSet, dataset_spec, load_images
from fedpsg.evaluation import EvalConfig, new_classifier
from fedpsg.ledger import Ledger
from fedpsg.methods import Method, PartyStage, Release, get_method
from fedpsg.policy import PartyPolicy
from fedpsg.privacy import PrivacyRecord
from fedpsg.protocol import StageReply, TrainRequest, config_from_hyperparameters
from fedpsg.secret import SecretRandomness


def charged_run(
    method: Method,
    stage: PartyStage,
    config: object,
    ledger: Ledger,
    policy: PartyPolicy,
    purpose: str,
    secret: SecretRandomness | None = None,
) -> Release:
    """Run ``method`` on ``stage`` after writing its planned cost to ``ledger`` (refused if it does not fit).

    The plan uses only public facts (sizes, config, budget), so the refusal comes before the method
    computes anything on the data.
    """
    planned = method.plan(stage, config)
    with ledger.release(planned, policy, method=method.name, purpose=purpose):
        release = method.run(stage, config, secret)
        _check_as_planned(method.name, planned, release.privacy)
    return release


def _check_as_planned(method: str, planned: PrivacyRecord, spent: PrivacyRecord) -> None:
    """A release whose mechanism differs from what the ledger holds must not leave the party."""
    same = (
        math.isclose(planned.noise_multiplier, spent.noise_multiplier, rel_tol=1e-9)
        and math.isclose(planned.sample_rate, spent.sample_rate, rel_tol=1e-12)
        and planned.steps == spent.steps
        and planned.adjacency == spent.adjacency
    )
    if not same:
        raise RuntimeError(f"{method} spent {spent} but planned {planned}: the release is withheld")


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
) -> StageReply:
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
    data = load_images(request.dataset, train=True, data_dir=data_dir).only_classes(request.classes)
    label = f"[{who}] {what}"
    print(f"{label}: {len(data)} private images of classes {request.classes}", flush=True)
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
    )
    ledger = Ledger(party_folder, request.dataset, who)
    release = charged_run(method, stage, config, ledger, policy, f"{what} (classes {request.classes})", secret)
    # A method that releases a set never trains the model on private data: it goes back as it came.
    model_state = release.model_state if method.releases == "model" else request.model_state
    return StageReply(release.privacy, model_state, release.images, release.labels)
