"""Parties in this process: the coordinator's ``Parties`` without Flower or Ray.

Each request goes through the same encoding as a Flower message and the same party code as the
ClientApp (``fedpsg.continual.party.run_stage``), so a whole scenario runs in one process: the fastest way
to try a new method, and what the Flower-free tests use. Each party's folder (policy and lifetime
ledger) is ``<state_dir>/party-<partition>``, as on a SuperNode.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fedpsg.budget.policy import load_policy, party_dir
from fedpsg.continual.party import run_stage
from fedpsg.continual.protocol import (
    TrainRequest,
    decode_reply,
    decode_train_request,
    encode_reply,
    encode_train_request,
)
from fedpsg.methods import Release
from fedpsg.runs.folder import PartyError


class LocalParties:
    def __init__(
        self,
        data_dir: str | None = None,
        device: str = "cpu",
        num_partitions: int | None = None,
        state_dir: str | Path | None = None,
        capacity: int = 1,
    ) -> None:
        self.data_dir, self.device, self.num_partitions, self.state_dir = data_dir, device, num_partitions, state_dir
        self.capacity = capacity  # stages run at once, in the coordinator's threads
        self.slots = threading.BoundedSemaphore(capacity)
        self.evaluations_share_slots = False  # tests: evaluations overlap the stages in flight
        self.replies: list[Release] = []  # every reply, as the coordinator received it

    def discover(self, partitions: list[int], timeout: float) -> None:
        if self.num_partitions is not None and max(partitions) >= self.num_partitions:
            raise PartyError(f"no party holds partition(s) {[p for p in partitions if p >= self.num_partitions]}")

    def send(self, request: TrainRequest, timeout: float) -> Release:
        received = decode_train_request(encode_train_request(request))  # as it would travel
        folder = party_dir(received.partition, self.state_dir)
        reply = run_stage(
            received,
            received.partition,
            party_folder=folder,
            policy=load_policy(None, folder),
            data_dir=self.data_dir,
            device=self.device,
        )
        reply = decode_reply(encode_reply(reply))
        self.replies.append(reply)
        return reply
