"""The ServerApp finds its parties (discovery survives a whoami that fails or expires) and charges
each reply, errors the SuperLink makes included, to the right party."""

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from fedpsg.continual.protocol import TrainRequest
from fedpsg.runs.folder import PartyUnavailable
from server.app import GridParties
from tests.inprocess import InProcessGrid, patch_task_identity


class SlowToStartGrid(InProcessGrid):
    """Node 1002's first whoami expires (as when a SuperNode is still starting under load)."""

    def __init__(self, data_dir) -> None:
        super().__init__(data_dir)
        self.whoami_sent: dict[int, int] = {}

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.whoami_sent[node] = self.whoami_sent.get(node, 0) + 1
            if node == 1002 and self.whoami_sent[node] == 1:
                error = Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="expired (TTL)")
                replies.append(Message(error, reply_to=message))
            else:
                replies.extend(super().send_and_receive([message], timeout=timeout))
        return replies


def test_a_node_whose_whoami_expired_is_asked_again(monkeypatch, data_dir):
    patch_task_identity(monkeypatch)
    grid = SlowToStartGrid(data_dir)
    parties = GridParties(grid, poll=0.01)
    parties.discover([0, 1, 2, 3, 4], timeout=30)
    assert parties.nodes == {k: 1000 + k for k in range(5)}
    assert grid.whoami_sent[1002] == 2 and grid.whoami_sent[1000] == 1


class NodeGoneGrid(InProcessGrid):
    """Node 1001 has gone: the SuperLink answers for it, from its own node id, as Flower does."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Grid.push_messages does
            if message.metadata.dst_node_id == 1001:
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
            else:
                replies.extend(super().send_and_receive([message], timeout=timeout))
        return replies


def test_the_superlinks_error_for_a_gone_node_is_charged_to_that_party(monkeypatch, data_dir):
    patch_task_identity(monkeypatch)
    parties = GridParties(NodeGoneGrid(data_dir), poll=0.01)
    parties.nodes = {0: 1000, 1: 1001, 2: 1002}
    results = parties.exchange({p: RecordDict() for p in (0, 1, 2)}, "query.whoami", "test", timeout=5.0)
    assert isinstance(results[1], PartyUnavailable)  # retryable: the node may come back
    for partition in (0, 2):
        assert int(results[partition].config_records["party"]["partition-id"]) == partition


def test_a_stage_sent_to_a_gone_node_is_retryable_and_names_the_stage(monkeypatch, data_dir):
    patch_task_identity(monkeypatch)
    parties = GridParties(NodeGoneGrid(data_dir), poll=0.01)
    parties.nodes = {1: 1001}
    request = TrainRequest("psg", 3, 1, "fmnist", 0, [1, 2], 10.0, 1e-5, 0, {}, {}, {"model": "convnet"})
    with pytest.raises(PartyUnavailable, match=r"^stage 3 \(psg, partition 1\): the party failed"):
        parties.send(request, timeout=5.0)
