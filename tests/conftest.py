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


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One cache for the whole session (DP-MEPF's public feature networks are trained once in it)."""
    return tmp_path_factory.mktemp("fedpsg-cache")


@pytest.fixture(autouse=True)
def fedpsg_cache(cache_root, monkeypatch) -> Path:
    """Tests never read or fill the user's ~/.cache/fedpsg."""
    monkeypatch.setenv("FEDPSG_CACHE_DIR", str(cache_root))
    return cache_root
