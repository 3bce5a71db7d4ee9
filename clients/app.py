"""Flower ClientApp: one party. It holds one class partition and answers the coordinator.

- ``query.whoami``: which partition this node holds.
- ``train.<method>``: run the method on the party's own data and reply with DP outputs only.

The partition comes from the node config (``partition-id``, ``num-partitions``); the data root
from the node config (``data-dir``) or ``FEDPSG_DATA_DIR``.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpsg.data import ImageSet, dataset_spec, load_images
from fedpsg.dpmerf import DPMerfConfig, dpmerf_generate
from fedpsg.dpsgd import DPSGDConfig, dpsgd_finetune
from fedpsg.models import build_model
from fedpsg.profiles import default_device
from fedpsg.protocol import (
    StageReply,
    TrainRequest,
    config_from_hyperparameters,
    decode_train_request,
    encode_reply,
)
from fedpsg.psg import PSGConfig, generate_private_set

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _prepare(context: Context) -> str:
    # Stages run one at a time, so the active party may use every core (Ray pins actors to 1 thread).
    torch.set_num_threads(int(context.node_config.get("torch-threads", os.cpu_count() or 1)))
    return str(context.node_config.get("device", default_device()))


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    partition, num_partitions = _partition(context)
    info = ConfigRecord({"partition-id": partition, "num-partitions": num_partitions})
    return Message(RecordDict({"party": info}), reply_to=msg)


def _receive(msg: Message, context: Context) -> tuple[TrainRequest, ImageSet, str]:
    """Decode a train request, check it is for this party, and load only this party's data."""
    request = decode_train_request(msg.content)
    partition, _ = _partition(context)
    if request.partition != partition:
        raise ValueError(f"request for partition {request.partition} reached the party holding {partition}")
    device = _prepare(context)
    data_dir = context.node_config.get("data-dir") or None
    data = load_images(request.dataset, train=True, data_dir=data_dir).only_classes(request.classes)
    print(f"[party {partition}] {request.method} stage {request.stage}: {len(data)} private images", flush=True)
    return request, data, device


def _reply(msg: Message, reply: StageReply) -> Message:
    return Message(encode_reply(reply), reply_to=msg)


@app.train("psg")
def train_psg(msg: Message, context: Context) -> Message:
    request, data, device = _receive(msg, context)
    synthetic = generate_private_set(
        data,
        request.classes,
        dataset_spec(request.dataset),
        epsilon=request.epsilon,
        delta=request.delta,
        config=config_from_hyperparameters(PSGConfig, request.hyperparameters),
        device=device,
        seed=request.seed,
        progress=False,
    )
    # PSG never trains the model on private data: the received model goes back untouched.
    return _reply(msg, StageReply(synthetic.privacy, request.model_state, synthetic.images, synthetic.labels))


@app.train("dpsgd")
def train_dpsgd(msg: Message, context: Context) -> Message:
    request, data, device = _receive(msg, context)
    spec = dataset_spec(request.dataset)
    arch = request.architecture
    model = build_model(arch["model"], spec.channels, spec.num_classes, spec.image_size, arch["width"], arch["depth"])
    model.load_state_dict(request.model_state)
    record = dpsgd_finetune(
        model,
        data,
        epsilon=request.epsilon,
        delta=request.delta,
        config=config_from_hyperparameters(DPSGDConfig, request.hyperparameters),
        device=device,
    )
    # Only the DP-trained model and its privacy record leave the party.
    return _reply(msg, StageReply(record, {k: v.cpu() for k, v in model.state_dict().items()}))


@app.train("dpmerf")
def train_dpmerf(msg: Message, context: Context) -> Message:
    request, data, device = _receive(msg, context)
    generated, record = dpmerf_generate(
        data,
        request.classes,
        dataset=request.dataset,
        epsilon=request.epsilon,
        delta=request.delta,
        config=config_from_hyperparameters(DPMerfConfig, request.hyperparameters),
        device=device,
        seed=request.seed,
    )
    # Generated samples are post-processing of the one noisy embedding; the model goes back untouched.
    return _reply(msg, StageReply(record, request.model_state, generated.images, generated.labels))
