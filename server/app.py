"""Flower ServerApp: the coordinator. It adapts Flower's Grid to ``fedpsg.continual.coordinator.Parties``
(and to the federated GAN's ``FedGANParties``); the run itself (stages or rounds, retries,
resume, evaluation, outputs) is ``Coordinator.run`` / ``FedGANRun.run``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedpsg.continual.coordinator import Coordinator
from fedpsg.continual.protocol import TrainRequest, decode_reply, encode_train_request
from fedpsg.federated_gan.config import KIND as FEDERATED_GAN
from fedpsg.federated_gan.config import FedGANSettings, federated_settings_from_run_config
from fedpsg.federated_gan.coordinator import FedGANRun
from fedpsg.methods import Release
from fedpsg.runs.folder import PartyError, PartyUnavailable
from fedpsg.runs.repeats import run_repeats, run_repeats_together, side_by_side
from fedpsg.runs.scenario import scenario_kind
from fedpsg.runs.settings import (
    DEFAULT_SCENARIO,
    RunConfig,
    RunSettings,
    as_bool,
    settings_from_run_config,
)

log = logging.getLogger("fedpsg.server")

# Error codes that mean "the node or its reply is gone", not "the party's code failed".
RETRYABLE_ERRORS = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.CLIENT_APP_CRASHED,
}


class GridParties:
    """The parties behind a Flower Grid; node ids are random, so partitions are asked for.

    Up to ``capacity`` requests are in flight at once, each sent from a coordinator thread of its
    own: Flower's Grids take that (the simulation's in-memory state holds a lock, the deployment's
    HTTP client is httpx's thread-safe one).
    """

    def __init__(self, grid: Grid, capacity: int = 1, poll: float = 2.0, evaluations_share_slots: bool = False) -> None:
        self.grid, self.poll, self.capacity = grid, poll, capacity
        self.evaluations_share_slots = evaluations_share_slots  # a simulation: parties on the coordinator's cores
        self.nodes: dict[int, int] = {}  # partition id -> node id
        self._asked: set[int] = set()
        self._discovering = threading.Lock()  # coordinators side by side share the node map
        self.slots = threading.BoundedSemaphore(capacity)  # requests in flight, across all of them

    def _ask(self, node_ids: list[int], timeout: float) -> None:
        queries = [Message(RecordDict(), dst_node_id=n, message_type="query.whoami", ttl=timeout) for n in node_ids]
        answered = set()
        for reply in self.grid.send_and_receive(queries, timeout=timeout) if queries else []:
            if reply.has_error():
                log.warning("a node did not answer whoami (asked again): %s", reply.error.reason)
                continue
            self.nodes[int(reply.content.config_records["party"]["partition-id"])] = reply.metadata.src_node_id
            answered.add(reply.metadata.src_node_id)
        # A busy or still-starting node can let the query expire: ask it again on the next poll.
        self._asked.difference_update(set(node_ids) - answered)

    def discover(self, partitions: list[int], timeout: float) -> None:
        with self._discovering:
            self._discover(partitions, timeout)

    def _discover(self, partitions: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            online = list(self.grid.get_node_ids())
            new = [n for n in online if n not in self._asked]
            self._asked.update(new)
            self._ask(new, timeout=min(60.0, timeout))
            self.nodes = {p: n for p, n in self.nodes.items() if n in online}
            missing = sorted(set(partitions) - set(self.nodes))
            if not missing:
                log.info("partitions -> nodes: %s", {p: self.nodes[p] for p in partitions})
                return
            if time.monotonic() > deadline:
                raise PartyUnavailable(
                    f"no node holds partition(s) {missing} after {timeout:.0f} s ({len(online)} nodes online)"
                )
            time.sleep(self.poll)

    def send(self, request: TrainRequest, timeout: float) -> Release:
        group = f"{request.method}-stage-{request.stage}"
        result = self.exchange({request.partition: encode_train_request(request)}, "train", group, timeout)
        reply = result[request.partition]
        if isinstance(reply, PartyError):
            raise type(reply)(f"{request.where}: {reply}")
        return decode_reply(reply)

    def exchange(
        self, requests: Mapping[int, RecordDict], message_type: str, group: str, timeout: float
    ) -> dict[int, RecordDict | PartyError]:
        """One message per partition, all in flight at once (federated GAN rounds)."""
        messages = [
            Message(content, dst_node_id=self.nodes[p], message_type=message_type, group_id=group, ttl=timeout)
            for p, content in requests.items()
        ]
        results: dict[int, RecordDict | PartyError] = {
            p: PartyUnavailable(f"no reply within {timeout:.0f} s") for p in requests
        }
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # An error the SuperLink makes for a node that went away comes from the SuperLink (node 0),
        # not from the party's node: match replies to what they answer, by message id (set on push).
        by_message = {m.metadata.message_id: p for p, m in zip(requests, messages) if m.metadata.message_id}
        by_node = {self.nodes[p]: p for p in requests}
        for reply in replies:
            partition = by_message.get(reply.metadata.reply_to_message_id, by_node.get(reply.metadata.src_node_id))
            if partition is None:
                log.warning("a reply to no message of this exchange was dropped: %s", reply.metadata)
                continue
            if reply.has_error():
                kind = PartyUnavailable if reply.error.code in RETRYABLE_ERRORS else PartyError
                results[partition] = kind(f"the party failed: {reply.error.reason}")
            else:
                results[partition] = reply.content
        return results


def make_server_app() -> ServerApp:
    """A ServerApp that reads its run from the Flower run config (``fedpsg.runs.settings.RUN_CONFIG_KEYS``).

    ``repeats``: repetitions, one after another (each its own run folder and public seed); with
    ``repeats-together`` all at once, repetition r's party k being partition ``r * parties + k``
    (a simulation whose launcher gave every repetition nodes of its own: ``fedpsg.simulate``).
    ``parallel-jobs``: party jobs in flight at once, in all (default: one per party, as in a
    deployment where every party is a node of its own). ``evaluation-threads``: set when the
    parties run on this machine's cores (a simulation): each evaluation then waits for one of those
    slots and uses that many threads.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = dict(context.run_config)
        values = RunConfig(config)
        if scenario_kind(values.get("scenario") or DEFAULT_SCENARIO) == FEDERATED_GAN:
            run_settings = federated_settings_from_run_config(config)
        else:
            run_settings = settings_from_run_config(config)
        repeats = values.positive_int("repeats", 1)
        jobs = values.positive_int("parallel-jobs", run_settings.num_partitions)
        threads = values.get("evaluation-threads", int)
        if threads is not None:
            torch.set_num_threads(threads)
        parties = GridParties(grid, capacity=jobs, evaluations_share_slots=threads is not None)

        def run_one(repetition: RunSettings | FedGANSettings) -> bool:
            if isinstance(repetition, FedGANSettings):
                FedGANRun(repetition).run(parties)
            else:
                Coordinator(repetition).run(parties)
            return True  # a run that does not complete raises

        def run_all(repetitions: list[RunSettings]) -> list[bool]:
            run_side_by_side(parties, side_by_side(repetitions))
            return [True] * len(repetitions)

        if values.get("repeats-together", as_bool):
            if isinstance(run_settings, FedGANSettings):
                raise ValueError("repeats-together is for continual scenarios")
            run_repeats_together(run_settings, repeats, run_all)
        else:
            run_repeats(run_settings, repeats, run_one)

    return app


def run_side_by_side(parties: GridParties, repetitions: list[RunSettings]) -> None:
    """Every repetition's coordinator at once; raise the first failure once all have stopped."""
    with ThreadPoolExecutor(len(repetitions), thread_name_prefix="repetition") as pool:
        runs = [pool.submit(Coordinator(repetition).run, parties) for repetition in repetitions]
    for run in runs:
        run.result()


app = make_server_app()
