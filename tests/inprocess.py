"""Parties in this process: a Flower ``Grid`` stand-in whose nodes call the real ClientApp directly.

The coordinator (the real ServerApp code) talks to five parties with real Flower messages and
the real ClientApp handlers, without Ray or a SuperLink, so a whole tiny scenario runs in seconds
and tests can patch anything inside the parties.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedpsg.budget.policy import PartyPolicy, default_state_dir, party_dir

# Room for the many releases a test asks of one party; each run at most eps 10, as a real party might allow.
LAB_POLICY = PartyPolicy(epsilon=1000.0, delta=1e-3, max_run_epsilon=10.0)


class InProcessGrid:
    def __init__(
        self,
        data_dir: Path,
        num_partitions: int = 5,
        torch_threads: int = 2,
        policy: PartyPolicy | None = LAB_POLICY,
        state_dir: Path | None = None,
    ) -> None:
        """Parties in ``state_dir`` (default: the test's, from the environment), each given ``policy``
        in its folder (None: the parties' own, or the built-in default)."""
        state_dir = state_dir or default_state_dir()
        if policy is not None:
            for k in range(num_partitions):
                policy.write(party_dir(k, state_dir) / "policy.yaml")
        self.contexts = {
            1000 + k: Context(
                run_id=1,
                node_id=1000 + k,
                node_config={
                    "partition-id": k,
                    "num-partitions": num_partitions,
                    "data-dir": str(data_dir),
                    "torch-threads": torch_threads,
                    "state-dir": str(state_dir),
                },
                state=RecordDict(),
                run_config={},
            )
            for k in range(num_partitions)
        }
        self.replies: list[Message] = []  # every reply sent to the coordinator, for inspection

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def patch_task_identity(monkeypatch) -> None:
    """The ClientApp expects a Flower task identity, as a SuperNode would set it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
