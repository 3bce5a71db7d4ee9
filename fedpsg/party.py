"""A party's side of a stage, independent of Flower: load only its own data, run the method,
and build the reply, which holds only DP outputs (the release, the model, the privacy record).
"""

from __future__ import annotations

from fedpsg.data import ImageSet, dataset_spec, load_images
from fedpsg.evaluation import EvalConfig, new_classifier
from fedpsg.methods import PartyStage, get_method
from fedpsg.protocol import StageReply, TrainRequest, config_from_hyperparameters
from fedpsg.secret import SecretRandomness


def run_stage(
    request: TrainRequest,
    partition: int,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    secret: SecretRandomness | None = None,
    progress_interval: float = 10.0,
) -> StageReply:
    """Answer ``request`` as the party holding ``partition``; ``secret`` defaults to fresh OS entropy."""
    if request.partition != partition:
        raise ValueError(f"request for partition {request.partition} reached the party holding {partition}")
    method = get_method(request.method)
    config = config_from_hyperparameters(method.config_class, request.hyperparameters)
    spec = dataset_spec(request.dataset)
    data = load_images(request.dataset, train=True, data_dir=data_dir).only_classes(request.classes)
    label = f"[party {partition}] {request.method} stage {request.stage}"
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
    release = method.run(stage, config, secret)
    # A method that releases a set never trains the model on private data: it goes back as it came.
    model_state = release.model_state if method.releases == "model" else request.model_state
    return StageReply(release.privacy, model_state, release.images, release.labels)
