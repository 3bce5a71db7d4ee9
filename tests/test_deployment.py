"""The compose topology as real processes on 127.0.0.1: SuperLink + 5 SuperNodes + `flwr run`."""

import json
import time

import pandas as pd
import pytest

from fedpsg.deploy import LocalDeployment
from fedpsg.runs.superlink import run_config_string

pytestmark = pytest.mark.slow


# One short classifier per evaluation: these tests are about processes and messages, and stage 1
# still scores far above chance (0.5) with it.
LIGHT_EVALUATION = "evaluation.num_evals=1 psg.evaluation.epochs=200"


def config(out, data_dir, **extra) -> str:
    values = {"profile": "tiny", "methods": "psg", "set": LIGHT_EVALUATION, "out": str(out), "data-dir": str(data_dir)}
    return run_config_string({**values, **extra})


def check_results(out, stages: int) -> pd.DataFrame:
    assert (out / "DONE").exists()
    frame = pd.read_csv(out / "results.csv")
    assert frame["stage"].tolist() == list(range(1, stages + 1))
    assert frame.loc[0, "accuracy"] > 0.75
    assert ((frame["epsilon"] <= 10.0) & (frame["epsilon"] > 9.99)).all()
    assert json.loads((out / "summary.json").read_text())["final_accuracy"]["psg"] > 0
    return frame


def test_tls_with_supernode_authentication(tmp_path, data_dir):
    out = tmp_path / "results"
    with LocalDeployment(tmp_path / "processes", data_dir=str(data_dir), tls=True, auth=True) as deployment:
        run_id = deployment.submit(config(out, data_dir, stages=1))
        assert deployment.wait(run_id, timeout=900) == "finished:completed"
    check_results(out, 1)
    assert (tmp_path / "processes" / "certificates" / "ca.crt").exists()


def test_a_party_killed_mid_stage_comes_back_and_the_run_completes(tmp_path, data_dir):
    """Also the insecure topology's end-to-end test: stage 2 needs stage 1's set from the ServerApp."""
    out = tmp_path / "results"
    log = out / "run.log"
    with LocalDeployment(tmp_path / "processes", data_dir=str(data_dir)) as deployment:
        run_id = deployment.submit(config(out, data_dir, stages=2, **{"reconnect-timeout": 300.0}))
        deadline = time.monotonic() + 300
        while not (log.exists() and "psg stage 2/2: party 1" in log.read_text()):
            assert time.monotonic() < deadline, "stage 2 never started"
            time.sleep(0.5)
        deployment.kill_supernode(1)  # the party of stage 2 crashes during its stage ...
        time.sleep(3)
        deployment.start_supernode(1)  # ... and is restarted with the same partition id
        assert deployment.wait(run_id, timeout=900) == "finished:completed"
    check_results(out, 2)
    assert not deployment.processes  # everything it started is stopped
    text = log.read_text()
    assert "retrying stage 2" in text
    assert sorted(p.name for p in (out / "sets" / "psg").glob("stage*.pt")) == ["stage1.pt", "stage2.pt"]
