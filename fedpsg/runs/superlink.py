"""Flower's SuperLink and the ``flwr`` CLI as child processes of a launcher.

``fedpsg.deploy`` starts a SuperLink with SuperNodes beside it (the compose topology as processes);
``fedpsg.simulate`` starts a simulation SuperLink (``flower-superlink --simulation``, the runtime behind
``flwr run``). Both submit this repository's app with ``flwr run`` and follow the run through the
SuperLink's Control API, as a user would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fedpsg.superlink")
REPO = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml, server/, clients/
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.args[0]} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def wait_for_control_api(connection: str, env: dict, process: subprocess.Popen, timeout: float = 180) -> None:
    """An open port is not a ready SuperLink: wait until its Control API answers ``flwr ls``."""
    deadline = time.monotonic() + timeout
    command = [str(BIN / "flwr"), "ls", connection, "--format", "json"]
    while subprocess.run(command, env=env, capture_output=True, timeout=60).returncode != 0:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {process.returncode} before its Control API answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SuperLink's Control API did not answer within {timeout:.0f} s")
        time.sleep(1.0)


def run_config_string(values: dict) -> str:
    """``--run-config`` / ``--federation-config`` syntax: strings in double quotes, numbers and booleans bare."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, str):
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def superlink_command(
    port: int,
    database: str,
    tls_dir: Path | None = None,
    auth: bool = False,
    host: str = "127.0.0.1",
    simulation: bool = False,
) -> list[str]:
    command = ["flower-superlink", "--host", host, "--port", str(port)]
    command += ["--database", database, "--disable-runtime-dependency-installation"]
    command += ["--simulation"] if simulation else []
    return command + superlink_security(tls_dir, auth)


def superlink_security(tls_dir: Path | None, auth: bool) -> list[str]:
    if tls_dir is None:
        return ["--insecure"]
    flags = ["--ssl-ca-certfile", str(tls_dir / "ca.crt"), "--ssl-certfile", str(tls_dir / "server.pem")]
    flags += ["--ssl-keyfile", str(tls_dir / "server.key")]
    return flags + (["--enable-supernode-auth"] if auth else [])


def _terminate_with_parent() -> None:
    """In a child before it starts (Linux): SIGTERM when the process that started it dies, even by SIGKILL."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def process_groups(pid: int) -> list[int]:
    """The process groups of ``pid`` and of every process it started, transitively (Linux's /proc;
    elsewhere ``pid``'s own group). Those that left their parent's group would survive a signal to it."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)"
        except (OSError, IndexError):
            continue  # gone meanwhile
        child = int(stat.parent.name)
        parents[child], groups[child] = int(fields[1]), int(fields[2])
    found, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found.add(child)
                todo.append(child)
    own = groups.get(pid, pid)
    return [own, *sorted({groups[p] for p in found if p in groups} - {own})]


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


@dataclass
class FlowerProcesses:
    """A SuperLink (and whatever a launcher starts beside it) as child processes logging into
    ``workdir``, and the ``flwr`` CLI connected to it. A context manager: it always stops them.

    ``env``: what every process gets beside this process's environment (children of the SuperLink,
    such as the simulation runtime and its Ray workers, inherit it).
    """

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    simulation: bool = False
    tls_dir: Path | None = None
    auth: bool = False
    superlink_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    connection = "local-superlink"

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # it would `uv sync` the app (network, torch)
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec
            **self.env,
        }

    # ----- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FlowerProcesses:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.write_connection()
        self.start_superlink()

    def write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.connection}"', f"[superlink.{self.connection}]"]
        lines.append(f'address = "127.0.0.1:{self.superlink_port}"')
        if self.tls_dir is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls_dir / "ca.crt"}"')
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` in a session of its own (so that stopping it stops its children too)
        that ends with this process (Linux: the parent-death signal), whichever way it ends."""
        logfile = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=self.env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
        )
        logfile.close()
        self.processes[name] = process
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def start_superlink(self) -> None:
        database = str(self.workdir / "superlink-state.db")
        command = superlink_command(self.superlink_port, database, self.tls_dir, self.auth, simulation=self.simulation)
        process = self.spawn("superlink", command)
        wait_for_port(self.superlink_port, 180, process)
        wait_for_control_api(self.connection, self.env, process)

    def kill(self, name: str) -> None:
        """Kill a process and everything it started at once (a crash, not a clean shutdown)."""
        process = self.processes.pop(name)
        for group in process_groups(process.pid):
            _signal_group(group, signal.SIGKILL)
        process.wait()
        log.info("killed %s (pid %d)", name, process.pid)

    def stop(self) -> None:
        """Stop every process and everything each started (the SuperLink's SuperExec and the runtime
        under it start sessions of their own), waiting until they are gone."""
        for name, process in reversed(list(self.processes.items())):
            groups = process_groups(process.pid)
            for group in groups:
                _signal_group(group, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            for group in groups:  # whatever ignored the request
                _signal_group(group, signal.SIGKILL)
            process.wait()
            log.info("stopped %s (pid %d)", name, process.pid)
        self.processes.clear()

    # ----- runs -------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "flwr"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result

    def submit(self, run_config: str, federation_config: str | None = None) -> int:
        """Submit the app in this repository; returns the run id."""
        extra = ["--federation-config", federation_config] if federation_config else []
        result = self.flwr("run", str(REPO), self.connection, "--run-config", run_config, *extra, "--format", "json")
        answer = json.loads(result.stdout)
        if not answer.get("success", True) or "run-id" not in answer:
            raise RuntimeError(f"flwr run refused the run: {answer.get('error-message', result.stdout)}")
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        result = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        runs = json.loads(result.stdout).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def wait(self, run_id: int, timeout: float, poll: float = 3.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f} s")

    def follow(self, run_id: int) -> str:
        """Print the run's log here as it comes (``flwr log --stream``) and return its final status."""
        subprocess.run([str(BIN / "flwr"), "log", str(run_id), self.connection, "--stream"], cwd=REPO, env=self.env)
        # The stream ends with the run (its status follows within seconds); should it end early, the run goes on.
        return self.wait(run_id, timeout=math.inf)
