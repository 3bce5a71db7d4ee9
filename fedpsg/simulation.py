"""A scenario on Flower's simulation runtime (the one behind ``flwr run``), and its virtual parties.

:func:`simulate` starts a simulation SuperLink for a run, submits the app with ``flwr run`` and
streams the run's log; the command line is ``fedpsg.simulate``. A continual run keeps as many
stages in flight as Ray has party slots (``cpus // party_cpus``), so independent stages run side
by side.

In a deployment every party writes its own policy (:mod:`fedpsg.budget.policy`); in a simulation one
user plays all parties, so the launcher writes them, once per run folder: each virtual party holds
its share of the data, allows the run's methods at most at the run's epsilon each, and has a
lifetime budget of one run per private method. Non-private requests need ``--trust-coordinator``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedpsg.budget.policy import POLICY_FILE, STATE_DIR_ENV, DataShare, PartyPolicy, load_policy, party_dir
from fedpsg.data.datasets import DATA_DIR_ENV
from fedpsg.federated_gan.config import FedGANSettings
from fedpsg.runs.repeats import side_by_side
from fedpsg.runs.settings import RunSettings
from fedpsg.runs.superlink import FlowerProcesses, run_config_string

log = logging.getLogger("fedpsg.simulation")

NON_PRIVATE_METHODS = ("fedavg-gan",)
WRITTEN_BY_SIMULATION = "# written by the simulation for a virtual party: rewritten when the run resumes\n"
RAY_WORKER_NICENESS = "RAY_worker_niceness"  # read by Ray when it starts its raylet
TORCH_THREADS_ENV = "FEDPSG_TORCH_THREADS"  # read by the ClientApp (clients/app.py)
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # a Ray job's config, read by ray.init (Ray Jobs sets it)
TRUST_HELP = "the simulated parties trust the coordinator: they also answer non-private requests (eps inf, fedavg-gan)"


def party_policies(
    settings: RunSettings | FedGANSettings, trust_coordinator: bool = False, methods: list[str] | None = None
) -> list[PartyPolicy]:
    """What each virtual party allows: its own share of the data, ``methods`` (default: the run's) at most
    at the run's epsilon each, and a lifetime budget of one run per private method (basic composition's
    (k eps, k delta), which the ledger's RDP composition of k such runs stays within)."""
    methods = list(methods or settings.methods)
    runs = max(1, len([m for m in methods if m not in NON_PRIVATE_METHODS]))
    finite = not math.isinf(settings.epsilon)
    common = dict(
        epsilon=runs * settings.epsilon if finite else 1.0,
        delta=min(0.5, runs * settings.delta),
        max_run_epsilon=settings.epsilon if finite else None,
        methods=tuple(methods),
        trust_coordinator=trust_coordinator,
        dataset=settings.scenario.dataset,
    )
    if isinstance(settings, FedGANSettings):
        share = DataShare(settings.num_partitions, settings.scenario.split, settings.seed)
        return [PartyPolicy(**common, share=share) for _ in range(settings.num_partitions)]
    return [PartyPolicy(**common, classes=tuple(classes)) for classes in settings.scenario.stages]


def check_trust(settings: RunSettings | FedGANSettings, trust_coordinator: bool) -> None:
    """Fail early, with the switch to use, on a run its parties would refuse as non-private."""
    non_private = [m for m in settings.methods if m in NON_PRIVATE_METHODS]
    if math.isinf(settings.epsilon):
        non_private = settings.methods
    if non_private and not trust_coordinator:
        raise ValueError(
            f"{', '.join(non_private)} at epsilon {settings.epsilon:g} is not private: the parties refuse it unless "
            "--trust-coordinator (or leave it out with --methods)"
        )


def prepare_parties(settings: RunSettings | FedGANSettings, trust_coordinator: bool = False) -> Path:
    """Write the virtual parties' policies under ``<out>/parties`` and return that state folder.

    A policy the simulation wrote before (its first line says so) grows with a resumed run that adds
    methods: every method run in the folder keeps its budget. Any other policy found there is the
    user's and is kept as it is."""
    check_trust(settings, trust_coordinator)
    state_dir = (settings.out / "parties").resolve()
    paths = [party_dir(p, state_dir) / POLICY_FILE for p in range(settings.num_partitions)]
    methods = list(settings.methods)
    for path in paths:
        if path.exists() and path.read_text().startswith(WRITTEN_BY_SIMULATION):
            earlier = load_policy(str(path)).methods or ()
            methods += [m for m in earlier if m not in methods]
    for path, policy in zip(paths, party_policies(settings, trust_coordinator, methods)):
        if not path.exists() or path.read_text().startswith(WRITTEN_BY_SIMULATION):
            policy.write(path, header=WRITTEN_BY_SIMULATION)
    return state_dir


@dataclass(frozen=True)
class SimulationResources:
    """What the simulation's parties get: Ray CPUs (and GPUs) per party, and an existing Ray cluster to run on."""

    party_cpus: int = 1  # Flower's simulation runtime takes whole CPUs per SuperNode
    party_gpus: float = 0.0
    ray_address: str | None = None

    def slots(self, nodes: int) -> int:
        """Party jobs in flight at once: one per Ray party slot of this machine (a cluster's own queue
        bounds the rest), so that side-by-side stages do not oversubscribe the cores."""
        if self.ray_address:
            return nodes
        return max(1, min(nodes, int((os.cpu_count() or 1) // self.party_cpus)))

    def threads(self) -> int:
        return self.party_cpus

    def federation_config(self, nodes: int) -> str:
        values = {
            "num-supernodes": nodes,
            "client-resources-num-cpus": int(self.party_cpus),
            "client-resources-num-gpus": float(self.party_gpus),
        }
        if not self.ray_address:  # a cluster brings its own resources
            values["init-args-num-cpus"] = os.cpu_count() or 1
        return run_config_string(values)

    def environment(self, state_dir: Path, data_dir: str | None) -> dict[str, str]:
        """What the simulation runtime and its Ray workers read (the SuperLink's children inherit it)."""
        env = {STATE_DIR_ENV: str(state_dir), TORCH_THREADS_ENV: str(self.threads())}
        if data_dir:
            env[DATA_DIR_ENV] = str(Path(data_dir).resolve())
        # Ray starts its workers 15 nice levels above the process that starts its raylet: beside any
        # ordinary process the parties would starve (a test suite beside a simulation took 3x as
        # long). An increment of 0: workers run at the driver's priority.
        env[RAY_WORKER_NICENESS] = os.environ.get(RAY_WORKER_NICENESS, "0")
        if self.ray_address:
            # Workers on other nodes are started by their own raylets and inherit none of this
            # environment: Ray hands a job's runtime environment to every worker of the job; the
            # runtime's ray.init reads it from here, as it does for a job submitted to the cluster.
            worker_env = {name: env[name] for name in (STATE_DIR_ENV, DATA_DIR_ENV, TORCH_THREADS_ENV) if name in env}
            env["RAY_ADDRESS"] = self.ray_address
            env[RAY_JOB_CONFIG_ENV] = json.dumps({"runtime_env": {"env_vars": worker_env}})
        return env


def simulate(
    run_config: dict, nodes: int, state_dir: Path, workdir: Path, resources: SimulationResources, data_dir: str | None
) -> str:
    """Run ``run_config`` on Flower's simulation runtime and return the run's final status.

    A simulation SuperLink (``flower-superlink --simulation``) starts for the run, with logs and
    its state in ``workdir``; ``flwr run`` submits this repository's app to it with ``nodes``
    virtual SuperNodes on Ray, the run's log streams here, and the SuperLink stops with the run.
    The parties read their folders under ``state_dir``.
    """
    run_config = {**run_config, "parallel-jobs": resources.slots(nodes)}
    if not resources.ray_address:  # the coordinator's evaluations take a slot of these cores
        run_config["evaluation-threads"] = resources.threads()
    env = resources.environment(state_dir, data_dir)
    with FlowerProcesses(workdir, env=env, simulation=True) as superlink:
        run_id = superlink.submit(run_config_string(run_config), resources.federation_config(nodes))
        log.info(
            "run %d submitted to the simulation runtime (%d virtual SuperNodes); its logs: %s", run_id, nodes, workdir
        )
        return superlink.follow(run_id)


def place_repetitions(repetitions: list[RunSettings], trust_coordinator: bool) -> Path:
    """Give each repetition's parties nodes of their own (``fedpsg.runs.repeats.side_by_side``):
    repetition r's party k is node ``r * parties + k``, whose folder ``<out>/nodes/party-<id>`` links
    to the repetition's own ``repeat-<r>/parties/party-<k>``. Returns that node folder."""
    nodes = repetitions[0].out.parent / "nodes"
    for repetition in side_by_side(repetitions):
        state_dir = prepare_parties(repetition, trust_coordinator)
        for k in range(repetition.num_partitions):
            link, target = party_dir(repetition.first_partition + k, nodes), party_dir(k, state_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    return nodes.resolve()
