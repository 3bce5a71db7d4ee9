"""The docker-compose topology as plain processes on 127.0.0.1 (no Docker needed).

    python -m fedpsg.deploy --profile cpu --out runs/deployment [--tls] [--auth]

Starts one SuperLink and one SuperNode per party with the same flags as docker-compose.yml,
submits the app with ``flwr run``, waits for the run to finish, checks that it completed,
and stops every process it started (by process id). The command lines are built here, once;
``tests/test_compose.py`` checks the compose file uses the same flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedpsg.budget.policy import POLICY_ENV, STATE_DIR_ENV
from fedpsg.runs.cli import add_run_arguments
from fedpsg.runs.repeats import repeat_settings
from fedpsg.runs.settings import format_epsilon, positive_int_from_run_config, settings_from_run_config

log = logging.getLogger("fedpsg.deploy")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "local-deployment"
DEMO_POLICY = REPO / "policies" / "demo.yaml"


def superlink_command(
    port: int, database: str, tls_dir: Path | None = None, auth: bool = False, host: str = "127.0.0.1"
) -> list[str]:
    command = ["flower-superlink", "--host", host, "--port", str(port)]
    command += ["--database", database, "--disable-runtime-dependency-installation"]
    command += _superlink_security(tls_dir, auth)
    return command


def _superlink_security(tls_dir: Path | None, auth: bool) -> list[str]:
    if tls_dir is None:
        return ["--insecure"]
    flags = ["--ssl-ca-certfile", str(tls_dir / "ca.crt"), "--ssl-certfile", str(tls_dir / "server.pem")]
    flags += ["--ssl-keyfile", str(tls_dir / "server.key")]
    return flags + (["--enable-supernode-auth"] if auth else [])


def node_config(partition: int, num_partitions: int, data_dir: str) -> str:
    """The SuperNode's ``--node-config`` (TOML values: strings in double quotes)."""
    return f'partition-id={partition} num-partitions={num_partitions} data-dir="{data_dir}"'


def supernode_command(
    superlink: str,
    port: int,
    partition: int,
    num_partitions: int,
    data_dir: str,
    tls_dir: Path | None = None,
    auth_key: Path | None = None,
) -> list[str]:
    command = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    command += ["--node-config", node_config(partition, num_partitions, data_dir)]
    if tls_dir is None:
        return [*command, "--insecure"]
    command += ["--root-certificates", str(tls_dir / "ca.crt")]
    return command + (["--auth-supernode-private-key", str(auth_key)] if auth_key else [])


def make_certificates(out: Path, parties: int, auth: bool) -> None:
    """A CA, a SuperLink certificate (SANs: superlink, localhost, 127.0.0.1) and node key pairs."""
    subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(out)], check=True, capture_output=True)
    if auth:
        for k in range(parties):
            key = out / f"node-{k}"
            if not key.exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                    check=True,
                    capture_output=True,
                )


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes as child processes; use as a context manager to always stop them."""

    workdir: Path
    data_dir: str
    parties: int = 5
    tls: bool = False
    auth: bool = False
    superlink_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS")
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls_dir = self.workdir / "certificates" if self.tls else None
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # The parties' folders (policy, lifetime ledgers) live with the deployment, as /state does in
            # compose; a party reads policies/demo.yaml unless it is given its own.
            STATE_DIR_ENV: str(self.workdir / "parties"),
            POLICY_ENV: os.environ.get(POLICY_ENV) or str(DEMO_POLICY),
        }
        self.node_ports = {k: free_port() for k in range(self.parties)}

    # ----- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.tls_dir is not None:
            make_certificates(self.tls_dir, self.parties, self.auth)
        self._write_connection()
        self.start_superlink()
        if self.auth:
            for k in range(self.parties):
                self.flwr("supernode", "register", str(self.tls_dir / f"node-{k}.pub"), CONNECTION)
        for k in range(self.parties):
            self.start_supernode(k)

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', f"[superlink.{CONNECTION}]"]
        lines.append(f'address = "127.0.0.1:{self.superlink_port}"')
        if self.tls_dir is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls_dir / "ca.crt"}"')
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        logfile = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            command, cwd=self.workdir, env=self.env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        logfile.close()
        self.processes[name] = process
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def start_superlink(self) -> None:
        database = str(self.workdir / "superlink-state.db")
        process = self._spawn("superlink", superlink_command(self.superlink_port, database, self.tls_dir, self.auth))
        _wait_for_port(self.superlink_port, 180, process)
        wait_for_control_api(CONNECTION, self.env, process)

    def start_supernode(self, partition: int) -> None:
        key = self.tls_dir / f"node-{partition}" if self.auth else None
        command = supernode_command(
            f"127.0.0.1:{self.superlink_port}",
            self.node_ports[partition],
            partition,
            self.parties,
            self.data_dir,
            self.tls_dir,
            key,
        )
        self._spawn(f"supernode-{partition}", command)

    def kill_supernode(self, partition: int) -> None:
        """Kill a SuperNode and its children at once (a crash, not a clean shutdown)."""
        process = self.processes.pop(f"supernode-{partition}")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.info("killed supernode-%d (pid %d)", partition, process.pid)

    def stop(self) -> None:
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=20)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
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

    def submit(self, run_config: str) -> int:
        """Submit the app in this repository; returns the run id."""
        result = self.flwr("run", str(REPO), CONNECTION, "--run-config", run_config, "--format", "json")
        return int(json.loads(result.stdout)["run-id"])

    def status(self, run_id: int) -> str:
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
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


def run_config_string(values: dict) -> str:
    """``--run-config`` syntax: strings in double quotes, numbers bare."""
    parts = []
    for key, value in values.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def run_config_from_args(args: argparse.Namespace, out: Path, data_dir: str) -> dict:
    """The Flower run config for the parsed flags (the keys of ``fedpsg.runs.settings.RUN_CONFIG_KEYS``)."""
    values = {
        "scenario": args.scenario,
        "eps": ",".join(format_epsilon(e) for e in args.eps) if args.eps else None,
        "delta": args.delta,
        "spc": args.spc,
        "methods": args.methods,
        "profile": args.profile,
        "replay": args.replay,
        "seed": args.seed,
        "stages": args.stages,
        "device": args.device,
        "stage-timeout": args.stage_timeout,
        "reconnect-timeout": args.reconnect_timeout,
        "stage-retries": args.stage_retries,
        "set": " ".join(args.overrides) or None,
        "repeats": args.repeats,
        "parallel-jobs": args.parallel_jobs,
        "out": str(out),
        "data-dir": data_dir,
    }
    return {k: v for k, v in values.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.deploy", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.set_defaults(out="runs/deployment", data_dir=os.environ.get("FEDPSG_DATA_DIR"))
    parser.add_argument("--workdir", type=Path, default=None, help="logs, state and certificates")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds to wait for the run")
    parser.add_argument(
        "--parallel-jobs", type=int, default=1,
        help="stages in flight at once (default 1: the SuperNodes share this machine, each using every core)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("--data-dir or FEDPSG_DATA_DIR is required (each party reads its partition from it)")
    out = Path(args.out).resolve()
    data_dir = str(Path(args.data_dir).resolve())
    values = run_config_from_args(args, out, data_dir)
    try:  # the same checks the ServerApp will make, before anything starts
        repeat_settings(settings_from_run_config(values), positive_int_from_run_config(values, "repeats", 1))
        positive_int_from_run_config(values, "parallel-jobs", 1)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    workdir = args.workdir or out.parent / f"{out.name}-processes"
    started = time.perf_counter()
    with LocalDeployment(workdir, data_dir, tls=args.tls or args.auth, auth=args.auth) as deployment:
        run_id = deployment.submit(run_config_string(values))
        log.info("submitted run %d; logs in %s", run_id, workdir)
        status = deployment.wait(run_id, args.timeout)
    completed = status == "finished:completed" and (out / "DONE").exists()
    print(f"run {run_id}: {status} in {time.perf_counter() - started:.0f} s; results in {out}")
    if not completed:
        print(f"error: the run did not complete; see {workdir}/*.log and {out}/run.log", file=sys.stderr)
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
