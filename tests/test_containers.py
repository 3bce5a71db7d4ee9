"""The compose topology in real containers: image build, SuperLink + 5 SuperNodes + submit to DONE,
the same with TLS + SuperNode authentication, and an unregistered SuperNode refused.

Needs a Docker engine: ``scripts/docker_setup.sh`` installs and starts one (root, Debian) and
builds a local base image when no registry answers. Where none can run, the tests are skipped
with the reason, unless FEDPSG_REQUIRE_CONTAINERS=1 (CI), which turns that into a failure.
Every stack is torn down by its own project name (``docker compose -p NAME down -v``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.containers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
IMAGE = "fedpsg:latest"
# One short classifier per evaluation: these tests are about containers and messages.
TINY = ["--profile", "tiny", "--methods", "psg", "--set", "evaluation.num_evals=1 psg.evaluation.epochs=200"]
COMPOSE = ["docker", "compose", "-f", "docker-compose.yml"]
TLS = ["-f", "docker-compose.tls.yml"]


def unavailable(reason: str):
    if os.environ.get("FEDPSG_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"containers required (FEDPSG_REQUIRE_CONTAINERS=1) but {reason}")
    pytest.skip(reason)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def project_name() -> str:
    return f"fedpsg-test-{uuid.uuid4().hex[:8]}"


def log(message: str) -> None:
    print(f"[containers {time.strftime('%H:%M:%S')}] {message}", flush=True)


@pytest.fixture(scope="module")
def base_image() -> str:
    """The engine, Compose v2 and a base image, set up by the project's own script."""
    if os.geteuid() != 0 and not engine_answers():
        unavailable("not root and no Docker engine answers (scripts/docker_setup.sh needs root)")
    if shutil.which("apt-get") is None and not engine_answers():
        unavailable("no Docker engine and no apt-get to install one")
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", "scripts/docker_setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=1200
        )
    except subprocess.TimeoutExpired:
        unavailable("scripts/docker_setup.sh did not finish in 1200 s")
    if result.returncode != 0:
        unavailable(f"scripts/docker_setup.sh failed: {result.stderr[-1500:]}")
    base = result.stdout.strip().splitlines()[-1].removeprefix("BASE_IMAGE=")
    log(f"docker_setup.sh: {time.monotonic() - started:.0f} s, base image {base}")
    return base


@pytest.fixture(scope="module")
def env(base_image, data_dir) -> dict:
    """Environment for compose: the base image, one data folder for all, a random published port."""
    values = {**os.environ, "BASE_IMAGE": base_image, "FEDPSG_DATA_DIR": str(data_dir)}
    values["SUPERLINK_PUBLISH"] = "127.0.0.1:"  # -> 127.0.0.1::9093, a free host port
    for key in ("SCENARIO", "EPS", "METHODS", "PROFILE", "STAGES", "SET", "RUN_NAME", "RESULTS_DIR", "CERTS_DIR"):
        values.pop(key, None)
    return values


@pytest.fixture(scope="module")
def image(env) -> str:
    """Build the image once (layers cached by the engine: fast the second time)."""
    started = time.monotonic()
    result = subprocess.run(
        [*COMPOSE, "build", "superlink"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    log(f"image build: {time.monotonic() - started:.0f} s")
    return IMAGE


def docker_run(image: str, *command: str, timeout: float = 120, extra: list[str] | None = None):
    return subprocess.run(
        ["docker", "run", "--rm", *(extra or []), image, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def demo(env: dict, project: str, *options: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    started = time.monotonic()
    try:
        return subprocess.run(
            ["bash", "scripts/compose_demo.sh", "--no-setup", "--project", project, *options],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        log(f"compose_demo.sh {' '.join(options)}: {time.monotonic() - started:.0f} s")
        down(project, env, tls="--tls" in options)  # the script does it too; this covers a timeout


def down(project: str, env: dict, tls: bool = False) -> None:
    files = [*COMPOSE, *(TLS if tls else [])]
    subprocess.run([*files[:2], "-p", project, *files[2:], "down", "-v", "--remove-orphans"],
                   cwd=REPO, env=env, capture_output=True, timeout=300)  # fmt: skip


def leftovers(project: str) -> list[str]:
    result = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.split()


def check_results(out: Path, stages: int) -> pd.DataFrame:
    assert (out / "DONE").exists()
    frame = pd.read_csv(out / "results.csv")
    assert frame["stage"].tolist() == list(range(1, stages + 1))
    assert frame.loc[0, "accuracy"] > 0.75
    assert ((frame["epsilon"] <= 10.0) & (frame["epsilon"] > 9.99)).all()
    assert json.loads((out / "summary.json").read_text())["final_accuracy"]["psg"] > 0
    return frame


def make_keys(certs: Path, names: list[str]) -> None:
    subprocess.run(["bash", "scripts/make_certs.sh", str(certs)], cwd=REPO, check=True, capture_output=True)
    for name in names:
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(certs / name)], check=True)


# ----- the image --------------------------------------------------------------------------------
def test_image_holds_the_app_and_nothing_else(image):
    result = docker_run(image, "bash", "-c", "ls -A /app; echo; id -u; stat -c %u /results /state")
    assert result.returncode == 0, result.stderr
    listing, ids = result.stdout.split("\n\n")
    assert sorted(listing.split()) == [
        "README.md",
        "clients",
        "fedpsg",
        "policies",
        "pyproject.toml",
        "scenarios",
        "server",
    ]
    assert ids.split() == ["1000", "1000", "1000"]  # the entrypoint drops root to uid 1000
    result = docker_run(image, "python", "-c", "import flwr, fedpsg; print(flwr.__version__)")
    assert result.stdout.strip() == "1.41.0", result.stderr


# ----- the demo ---------------------------------------------------------------------------------
def test_insecure_two_stage_run_completes(image, env, tmp_path):
    project = project_name()
    run_env = {**env, "RESULTS_DIR": str(tmp_path / "results"), "RUN_NAME": "insecure"}
    result = demo(run_env, project, *TINY, "--stages", "2")  # stage 2 needs stage 1's set
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    out = tmp_path / "results" / "insecure"
    assert f"results in {out}" in result.stdout
    check_results(out, 2)
    assert not leftovers(project)


def test_tls_with_supernode_authentication_completes(image, env, tmp_path):
    project = project_name()
    certs = tmp_path / "certificates"
    run_env = {**env, "RESULTS_DIR": str(tmp_path / "results"), "RUN_NAME": "tls", "CERTS_DIR": str(certs)}
    result = demo(run_env, project, "--tls", *TINY, "--stages", "1")
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    check_results(tmp_path / "results" / "tls", 1)
    assert "register: node-4.pub registered" in result.stdout
    # The host's private keys kept their permissions: the containers read copies.
    for key in ["server.key", *(f"node-{k}" for k in range(5))]:
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    assert not leftovers(project)


def test_a_supernode_with_an_unregistered_key_is_refused(image, env, tmp_path):
    project = project_name()
    certs = tmp_path / "certificates"
    make_keys(certs, [*(f"node-{k}" for k in range(5)), "intruder"])
    run_env = {**env, "CERTS_DIR": str(certs), "RESULTS_DIR": str(tmp_path / "results")}
    compose = ["docker", "compose", "-p", project, "-f", "docker-compose.yml", *TLS]
    try:
        up = subprocess.run(
            [*compose, "up", "-d", "--wait", "register"], cwd=REPO, env=run_env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr[-3000:]
        mounts = ["-v", f"{certs / 'ca.crt'}:/mnt/certificates/ca.crt:ro"]
        mounts += ["-v", f"{certs / 'intruder'}:/mnt/certificates/intruder:ro"]
        node = docker_run(
            image,
            *("flower-supernode", "--superlink", "superlink:9093", "--port", "9100"),
            *("--node-config", 'partition-id=0 num-partitions=5 data-dir="/data"'),
            *("--root-certificates", "/certificates/ca.crt", "--auth-supernode-private-key", "/certificates/intruder"),
            timeout=300,
            extra=["--network", f"{project}_default", *mounts],
        )
        output = node.stdout + node.stderr
        assert node.returncode != 0, output[-3000:]
        assert "Failed to activate SuperNode" in output, output[-3000:]
        superlink = subprocess.run(
            [*compose, "logs", "superlink"], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=120
        )
        assert "No SuperNode found with the given public key" in superlink.stdout
    finally:
        down(project, run_env, tls=True)
    assert not leftovers(project)


# ----- the GPU variant: validated only (no GPU on CI) --------------------------------------------
def test_gpu_compose_file_validates(base_image, env):
    result = subprocess.run(
        [*COMPOSE, "-f", "docker-compose.gpu.yml", "config", "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ["superlink", *(f"supernode-{k}" for k in range(5))]:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
