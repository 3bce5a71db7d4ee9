"""The ServerApp's discovery survives parties whose first whoami fails or expires."""

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

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
