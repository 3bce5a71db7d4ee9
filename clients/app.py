"""Flower ClientApp: one party. It holds one class partition and answers the coordinator.

- ``query.whoami``: which partition this node holds.
- ``train``: run the requested method on the party's own data (``fedpsg.continual.party``) and reply
  with DP outputs only.
- ``train.fed_gswgan`` / ``train.fedavg_gan``: one round of a federated GAN scenario
  (``fedpsg.federated_gan.party``); the party's critic stays in its folder.

Every request is checked against the party's own policy and charged to its lifetime ledger,
both in its folder ``<state dir>/party-<partition>`` (state dir: node config ``state-dir``, else
``FEDPSG_PARTY_STATE_DIR``, else ``~/.fedpsg/party-state``; policy: node config ``policy``, else
the folder's ``policy.yaml``, else ``FEDPSG_PARTY_POLICY``; see ``fedpsg.budget.policy``). A refused
request fails with the reason, which the coordinator reports.

The partition comes from the node config (``partition-id``, ``num-partitions``); the data root
from the node config (``data-dir``) or ``FEDPSG_DATA_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpsg.budget.policy import PartyPolicy, load_policy, party_dir
from fedpsg.continual.party import run_stage
from fedpsg.continual.protocol import decode_train_request, encode_reply
from fedpsg.federated_gan import party as gan_party
from fedpsg.federated_gan.protocol import (
    decode_model_request,
    decode_sample_request,
    encode_gradient_reply,
    encode_model_reply,
)
from fedpsg.runs.settings import default_device

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _folder_and_policy(context: Context) -> tuple[Path, PartyPolicy]:
    """The party's folder and the policy it reads (node config, its folder, environment; never the request)."""
    folder = party_dir(_partition(context)[0], context.node_config.get("state-dir") or None)
    return folder, load_policy(context.node_config.get("policy") or None, folder)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    partition, num_partitions = _partition(context)
    info = ConfigRecord({"partition-id": partition, "num-partitions": num_partitions})
    return Message(RecordDict({"party": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    # A SuperNode of its own may use every core (Ray pins actors to 1 thread); node config
    # torch-threads or FEDPSG_TORCH_THREADS set fewer (the simulation: its party slot's CPUs).
    threads = context.node_config.get("torch-threads") or os.environ.get("FEDPSG_TORCH_THREADS") or os.cpu_count()
    torch.set_num_threads(int(threads or 1))
    folder, policy = _folder_and_policy(context)
    ray = sys.modules.get("ray")  # a simulation's worker: say which node of the cluster runs the stage
    if ray is not None and ray.is_initialized():
        print(f"[party {_partition(context)[0]}] on Ray node {ray.get_runtime_context().get_node_id()[:8]}", flush=True)
    reply = run_stage(
        decode_train_request(msg.content),
        _partition(context)[0],
        party_folder=folder,
        policy=policy,
        data_dir=context.node_config.get("data-dir") or None,
        device=str(context.node_config.get("device", default_device())),
    )
    return Message(encode_reply(reply), reply_to=msg)


def _check_partition(partition: int, context: Context) -> None:
    if partition != _partition(context)[0]:
        raise ValueError(f"request for partition {partition} reached the party holding {_partition(context)[0]}")


@app.train("fed_gswgan")
def fed_gswgan(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # the round's parties run side by side
    request, images, labels = decode_sample_request(msg.content)
    _check_partition(request.partition, context)
    folder, policy = _folder_and_policy(context)
    data_dir = context.node_config.get("data-dir") or None
    reply = gan_party.answer_samples(request, images, labels, party_folder=folder, policy=policy, data_dir=data_dir)
    return Message(encode_gradient_reply(reply), reply_to=msg)


@app.train("fedavg_gan")
def fedavg_gan(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    request, generator, critic = decode_model_request(msg.content)
    _check_partition(request.partition, context)
    folder, policy = _folder_and_policy(context)
    data_dir = context.node_config.get("data-dir") or None
    reply = gan_party.answer_models(request, generator, critic, party_folder=folder, policy=policy, data_dir=data_dir)
    return Message(encode_model_reply(reply), reply_to=msg)
