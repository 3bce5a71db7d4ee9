"""Flower ClientApp: one party. It holds one class partition and answers the coordinator.

- ``query.whoami``: which partition this node holds.
- ``train.<method>``: run the method on the party's own data and reply with DP outputs only.

The partition comes from the node config (``partition-id``, ``num-partitions``); the data root
from the node config (``data-dir``) or ``FEDPSG_DATA_DIR``.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpsg.data import dataset_spec, load_images
from fedpsg.profiles import default_device
from fedpsg.protocol import StageReply, config_from_hyperparameters, decode_train_request, encode_reply
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


@app.train("psg")
def train_psg(msg: Message, context: Context) -> Message:
    request = decode_train_request(msg.content)
    partition, _ = _partition(context)
    if request.partition != partition:
        raise ValueError(f"request for partition {request.partition} reached the party holding {partition}")
    device = _prepare(context)
    data_dir = context.node_config.get("data-dir") or None
    spec = dataset_spec(request.dataset)
    data = load_images(spec.name, train=True, data_dir=data_dir).only_classes(request.classes)
    started = time.perf_counter()
    synthetic = generate_private_set(
        data,
        request.classes,
        spec,
        epsilon=request.epsilon,
        delta=request.delta,
        config=config_from_hyperparameters(PSGConfig, request.hyperparameters),
        device=device,
        seed=request.seed,
        progress=False,
    )
    print(f"[party {partition}] PSG stage {request.stage} done in {time.perf_counter() - started:.0f} s", flush=True)
    # PSG never trains the model on private data: the received model goes back untouched.
    reply = StageReply(synthetic.privacy, request.model_state, synthetic.images, synthetic.labels)
    return Message(encode_reply(reply), reply_to=msg)
