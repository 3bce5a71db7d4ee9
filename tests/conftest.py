import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST/FashionMNIST in torchvision's layout (CI sets FEDPSG_DATA_DIR=../shared/data)."""
    root = Path(os.environ.get("FEDPSG_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    if not (root / "MNIST" / "raw").exists():
        pytest.fail(f"real data not found under {root}: set FEDPSG_DATA_DIR")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: intra-op threads only fight each other on a small CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def party_state(tmp_path_factory, monkeypatch) -> Path:
    """Every test's parties get fresh folders (policy, lifetime ledger), never the user's ~/.fedpsg."""
    state = tmp_path_factory.mktemp("party-state")
    monkeypatch.setenv("FEDPSG_PARTY_STATE_DIR", str(state))
    monkeypatch.delenv("FEDPSG_PARTY_POLICY", raising=False)
    return state
