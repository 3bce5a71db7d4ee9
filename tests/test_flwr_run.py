"""`flwr run .` runs the same app from pyproject's Flower config (simulation SuperLink)."""

import json
import os
import subprocess

import pytest

from fedpsg.runs.superlink import BIN, REPO, free_port, wait_for_control_api


@pytest.mark.slow
def test_flwr_run_on_a_simulation_superlink(tmp_path, data_dir):
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FEDPSG_DATA_DIR": str(data_dir)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the SuperLink starts flower-superexec from PATH
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    superlink = subprocess.Popen(
        [BIN / "flower-superlink", "--simulation", "--insecure", "--disable-runtime-dependency-installation",
         "--port", str(port), "--database", str(tmp_path / "state.db")],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_control_api("sim", env, superlink)
        out = tmp_path / "out"
        run_config = f'profile="tiny" stages=1 methods="psg" out="{out}"'
        result = subprocess.run(
            [BIN / "flwr", "run", ".", "sim", "--stream", "--run-config", run_config, "--federation-config",
             "num-supernodes=5 client-resources-num-cpus=1 init-args-num-cpus=2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # `flwr run` exits 0 even when the ServerApp fails: check the run's own outputs.
        assert (out / "DONE").exists(), result.stdout[-3000:]
        rows = json.loads((out / "summary.json").read_text())["stages"]
        assert [r["stage"] for r in rows] == [1] and rows[0]["accuracy"] > 0.75
    finally:
        superlink.terminate()
        superlink.wait(timeout=30)
