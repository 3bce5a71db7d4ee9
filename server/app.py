"""Flower ServerApp: the coordinator.

It asks every node which partition it holds, then visits the stages in scenario order: one
train message per stage to the party holding that stage's classes (with a timeout), stores
the reply at once, replays and evaluates, and moves on. The algorithms live in ``fedpsg``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedpsg.coordinator import Coordinator
from fedpsg.data import load_images
from fedpsg.protocol import TrainRequest, decode_reply, encode_train_request
from fedpsg.results import accuracy_table
from fedpsg.settings import RunSettings, resolve_settings

log = logging.getLogger("fedpsg.server")


class PartyError(RuntimeError):
    """A party failed or did not answer in time."""


class PartyUnavailable(PartyError):
    """The party's node went away (or never answered): worth waiting for it to come back."""


# Error codes that mean "the node or its reply is gone", not "the party's code failed".
RETRYABLE_ERRORS = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.CLIENT_APP_CRASHED,
}


def settings_from_run_config(config: dict) -> RunSettings:
    """RunSettings from ``[tool.flwr.app.config]`` / ``flwr run --run-config`` values."""

    def get(key: str, default=None):
        value = config.get(key, default)
        return None if value in ("", None) else value

    methods = get("methods")
    return resolve_settings(
        str(get("scenario", "split_fmnist")),
        epsilon=float(get("eps")) if get("eps") is not None else None,
        delta=float(get("delta")) if get("delta") is not None else None,
        spc=int(get("spc")) if get("spc") is not None else None,
        profile=get("profile"),
        seed=int(get("seed", 0)),
        out=get("out"),
        stages=int(get("stages")) if get("stages") is not None else None,
        device=get("device"),
        methods=str(methods).split(",") if methods else None,
        replay=get("replay"),
        stage_timeout=float(get("stage-timeout", 3600.0)),
        reconnect_timeout=float(get("reconnect-timeout", 600.0)),
        stage_retries=int(get("stage-retries", 2)),
        data_dir=get("data-dir"),
    )


def ask_partitions(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, int]:
    """Partition id -> node id, from the nodes among ``node_ids`` that answer ``query.whoami``."""
    queries = [Message(RecordDict(), dst_node_id=n, message_type="query.whoami", ttl=timeout) for n in node_ids]
    partitions: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout) if queries else []:
        if reply.has_error():
            log.warning("node %s did not answer whoami: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        partitions[int(reply.content.config_records["party"]["partition-id"])] = reply.metadata.src_node_id
    return partitions


def discover_partitions(grid: Grid, wanted: list[int], timeout: float, poll: float = 2.0) -> dict[int, int]:
    """Map each wanted partition id to a node id (node ids are random), waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    partitions: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        online = list(grid.get_node_ids())
        new = [n for n in online if n not in asked]
        asked.update(new)
        partitions.update(ask_partitions(grid, new, timeout=min(60.0, timeout)))
        partitions = {p: n for p, n in partitions.items() if n in online}
        missing = sorted(set(wanted) - set(partitions))
        if not missing:
            return partitions
        if time.monotonic() > deadline:
            raise PartyUnavailable(
                f"no node holds partition(s) {missing} after {timeout:.0f} s ({len(online)} nodes online)"
            )
        time.sleep(poll)


def run_stage(grid: Grid, node_id: int, request: TrainRequest, timeout: float):
    message = Message(
        encode_train_request(request),
        dst_node_id=node_id,
        message_type=f"train.{request.method}",
        group_id=f"{request.method}-stage-{request.stage}",
        ttl=timeout,
    )
    replies = list(grid.send_and_receive([message], timeout=timeout))
    where = f"stage {request.stage} ({request.method}, partition {request.partition})"
    if not replies:
        raise PartyUnavailable(f"{where}: no reply within {timeout:.0f} s")
    if replies[0].has_error():
        error = replies[0].error
        kind = PartyUnavailable if error.code in RETRYABLE_ERRORS else PartyError
        raise kind(f"{where}: the party failed: {error.reason}")
    return decode_reply(replies[0].content)


def run_stage_with_retries(grid: Grid, partitions: dict[int, int], request: TrainRequest, settings: RunSettings):
    """Run a stage; if the party's node disappears, wait (bounded) for it to come back and retry."""
    where = f"stage {request.stage} ({request.method}, partition {request.partition})"
    for attempt in range(settings.stage_retries + 1):
        try:
            return run_stage(grid, partitions[request.partition], request, settings.stage_timeout)
        except PartyUnavailable as err:
            if attempt == settings.stage_retries:
                raise PartyError(f"{err}; gave up after {attempt + 1} attempts") from err
            log.warning(
                "%s; waiting up to %.0f s for partition %d to come back",
                err, settings.reconnect_timeout, request.partition,
            )  # fmt: skip
        try:  # a restarted SuperNode has a new node id: find it again
            partitions.update(discover_partitions(grid, [request.partition], settings.reconnect_timeout))
        except PartyUnavailable as err:
            raise PartyError(f"{where}: the party did not come back ({err})") from err
        log.info("partition %d is back (node %s): retrying stage %d", request.partition,
                 partitions[request.partition], request.stage)  # fmt: skip


def hyperparameters_for(settings: RunSettings, method: str) -> dict:
    """The method's config, sent to the party inside the message."""
    return asdict(getattr(settings.profile, method))


def coordinate(grid: Grid, settings: RunSettings) -> Coordinator:
    """The whole run: discovery, then every method's stages in order."""
    settings.out.mkdir(parents=True, exist_ok=True)
    (settings.out / "DONE").unlink(missing_ok=True)  # written again only if this run completes
    handler = logging.FileHandler(settings.out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedpsg").addHandler(handler)
    logging.getLogger("fedpsg").setLevel(logging.INFO)
    try:
        test = load_images(settings.scenario.dataset, train=False, data_dir=settings.data_dir)
        coordinator = Coordinator(settings, test)
        partitions = discover_partitions(grid, list(range(settings.num_partitions)), settings.reconnect_timeout)
        log.info("partitions -> nodes: %s", partitions)
        for method in settings.methods:
            for stage, classes in enumerate(settings.stages, start=1):
                if coordinator.is_done(method, stage):
                    log.info("%s stage %d/%d already done: skipped", method, stage, len(settings.stages))
                    continue
                partition = stage - 1
                log.info(
                    "%s stage %d/%d: party %d, classes %s", method, stage, len(settings.stages), partition, classes
                )
                started = time.perf_counter()
                if coordinator.received_set(method, stage):  # reply stored, evaluation interrupted
                    row = coordinator.resume_stage(method, stage)
                else:
                    request = TrainRequest(
                        method=method,
                        stage=stage,
                        partition=partition,
                        dataset=settings.scenario.dataset,
                        classes=classes,
                        epsilon=settings.epsilon,
                        delta=settings.delta,
                        seed=settings.seed + stage,
                        hyperparameters=hyperparameters_for(settings, method),
                        model_state=coordinator.current_model_state(method, stage),
                        architecture=coordinator.architecture(method),
                    )
                    reply = run_stage_with_retries(grid, partitions, request, settings)
                    row = coordinator.accept(method, stage, classes, reply, time.perf_counter() - started)
                eps = row["epsilon"]
                log.info(
                    "%s stage %d done: %.2f%% over seen classes, party spent eps=%s (%.0f s)",
                    method, stage, 100 * row["accuracy"], "inf" if math.isinf(eps) else f"{eps:.4f}",
                    time.perf_counter() - started,
                )  # fmt: skip
        rows = coordinator.rows()
        if rows:
            import pandas as pd

            print(accuracy_table(pd.DataFrame(rows)).to_string(), flush=True)
        (settings.out / "DONE").write_text("completed\n")
        return coordinator
    finally:
        logging.getLogger("fedpsg").removeHandler(handler)
        handler.close()


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp for ``settings``, or one that reads them from the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinate(grid, settings or settings_from_run_config(dict(context.run_config)))

    return app


app = make_server_app()
