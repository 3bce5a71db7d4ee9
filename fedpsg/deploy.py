"""The docker-compose topology as plain processes on 127.0.0.1 (no Docker needed).

    python -m fedpsg.deploy --profile cpu --out runs/deployment [--tls] [--auth]

Starts one SuperLink and one SuperNode per party with the same flags as docker-compose.yml,
submits the app with ``flwr run``, waits for the run to finish, checks that it completed,
and stops every process it started (by process id). The command lines are built here, once;
``tests/test_compose.py`` checks the compose file uses the same flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedpsg.budget.policy import POLICY_ENV, STATE_DIR_ENV
from fedpsg.runs.cli import add_run_arguments, run_config_from_args
from fedpsg.runs.repeats import repeat_settings
from fedpsg.runs.settings import RunConfig, settings_from_run_config
from fedpsg.runs.superlink import REPO, FlowerProcesses, free_port, run_config_string

log = logging.getLogger("fedpsg.deploy")
DEMO_POLICY = REPO / "policies" / "demo.yaml"


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


@dataclass
class LocalDeployment(FlowerProcesses):
    """SuperLink + SuperNodes as child processes; use as a context manager to always stop them."""

    data_dir: str = ""
    parties: int = 5
    tls: bool = False
    connection = "local-deployment"

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS")
        workdir = Path(self.workdir).resolve()
        self.tls_dir = workdir / "certificates" if self.tls else None
        # The parties' folders (policy, lifetime ledgers) live with the deployment, as /state does in
        # compose; a party reads policies/demo.yaml unless it is given its own.
        self.env = {
            STATE_DIR_ENV: str(workdir / "parties"),
            POLICY_ENV: os.environ.get(POLICY_ENV) or str(DEMO_POLICY),
            **self.env,
        }
        super().__post_init__()
        self.node_ports = {k: free_port() for k in range(self.parties)}

    def start(self) -> None:
        if self.tls_dir is not None:
            make_certificates(self.tls_dir, self.parties, self.auth)
        super().start()
        if self.auth:
            for k in range(self.parties):
                self.flwr("supernode", "register", str(self.tls_dir / f"node-{k}.pub"), self.connection)
        for k in range(self.parties):
            self.start_supernode(k)

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
        self.spawn(f"supernode-{partition}", command)

    def kill_supernode(self, partition: int) -> None:
        """Kill a SuperNode and its children at once (a crash, not a clean shutdown)."""
        self.kill(f"supernode-{partition}")


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
    values = run_config_from_args(args, out=out, data_dir=data_dir)
    try:  # the same checks the ServerApp will make, before anything starts
        repeat_settings(settings_from_run_config(values), RunConfig(values).positive_int("repeats", 1))
        RunConfig(values).positive_int("parallel-jobs", 1)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    workdir = args.workdir or out.parent / f"{out.name}-processes"
    started = time.perf_counter()
    with LocalDeployment(workdir, data_dir=data_dir, tls=args.tls or args.auth, auth=args.auth) as deployment:
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
