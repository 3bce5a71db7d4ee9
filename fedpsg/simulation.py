"""A scenario on Flower's simulation engine (Ray), and the policies of its virtual parties.

:func:`simulate` runs either scenario kind with ``flwr.simulation.run_simulation``; the command
line is ``fedpsg.simulate``. A continual run keeps as many stages in flight as Ray has party
slots (``cpus // party_cpus``), so independent stages run side by side.

In a deployment every party writes its own policy (:mod:`fedpsg.budget.policy`); in a simulation one
user plays all parties, so the launcher writes them, once per run folder: each virtual party holds
its share of the data, allows the run's methods at most at the run's epsilon each, and has a
lifetime budget of one run per private method. Non-private requests need ``--trust-coordinator``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from pathlib import Path

from fedpsg.budget.policy import POLICY_FILE, STATE_DIR_ENV, DataShare, PartyPolicy, load_policy, party_dir
from fedpsg.data.datasets import DATA_DIR_ENV
from fedpsg.federated_gan.config import FedGANSettings
from fedpsg.runs.settings import RunSettings

NON_PRIVATE_METHODS = ("fedavg-gan",)
WRITTEN_BY_SIMULATION = "# written by the simulation for a virtual party: rewritten when the run resumes\n"
RAY_WORKER_NICENESS = "RAY_worker_niceness"  # read by Ray when it starts its raylet
TORCH_THREADS_ENV = "FEDPSG_TORCH_THREADS"  # read by the ClientApp (clients/app.py)
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


def simulate(
    settings: RunSettings | FedGANSettings | list[RunSettings],
    ray_address: str | None = None,
    party_cpus: float = 1.0,
    party_gpus: float | None = None,
    trust_coordinator: bool = False,
) -> None:
    """Run the scenario with ``flwr.simulation.run_simulation`` (Ray backend).

    A list of continual settings (the repetitions of ``--repeats``) runs side by side in one
    simulation: each repetition keeps its own virtual parties (their folders and ledgers under
    its own run folder), as nodes of their own, and the stages of all of them share the cores.
    """
    import torch
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    if isinstance(settings, list):
        state_dir, placed = place_repetitions(settings, trust_coordinator)
        first, nodes = settings[0], sum(s.num_partitions for s in settings)
    else:
        state_dir, placed = prepare_parties(settings, trust_coordinator), settings
        first, nodes = settings, settings.num_partitions
    # Parties run in Ray actors: they read their folder (policy, ledger) from the environment.
    os.environ[STATE_DIR_ENV] = str(state_dir)
    if first.data_dir:  # parties run in Ray actors: they read the data root from the environment
        os.environ[DATA_DIR_ENV] = str(os.path.abspath(first.data_dir))
    # Ray starts its workers 15 nice levels above the process that starts its raylet: beside any
    # ordinary process the parties would starve (a test suite beside a simulation took 3x as
    # long). An increment of 0: workers run at the driver's priority.
    os.environ.setdefault(RAY_WORKER_NICENESS, "0")
    gpus = party_gpus if party_gpus is not None else (1.0 if first.device.startswith("cuda") else 0.0)
    init_args: dict = {"num_cpus": os.cpu_count() or 1}
    # As many stages in flight as Ray has party slots here (a cluster's own queue bounds the rest),
    # each party with the threads of its slot, so that side-by-side stages do not oversubscribe.
    slots = nodes if ray_address else int((os.cpu_count() or 1) // party_cpus)
    os.environ.setdefault(TORCH_THREADS_ENV, str(max(1, int(party_cpus))))
    if ray_address:
        connect_to_cluster(ray_address)
    else:  # the coordinator's evaluations take a slot of these cores, with a slot's threads
        torch.set_num_threads(int(os.environ[TORCH_THREADS_ENV]))
    server_app = make_server_app(placed, max(1, min(slots, nodes)), evaluations_share_slots=not ray_address)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": party_cpus, "num_gpus": gpus}, "init_args": init_args},
    )


def place_repetitions(repetitions: list[RunSettings], trust_coordinator: bool) -> tuple[Path, list[RunSettings]]:
    """Give each repetition's parties node ids of their own: repetition r's party k is node
    ``r * parties + k``, whose folder ``<out>/nodes/party-<id>`` links to the repetition's own
    ``repeat-<r>/parties/party-<k>``. Returns that node folder and the placed settings."""
    nodes = repetitions[0].out.parent / "nodes"
    placed, offset = [], 0
    for repetition in repetitions:
        state_dir = prepare_parties(repetition, trust_coordinator)
        for k in range(repetition.num_partitions):
            link, target = party_dir(offset + k, nodes), party_dir(k, state_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
        placed.append(replace(repetition, first_partition=offset))
        offset += repetition.num_partitions
    return nodes.resolve(), placed


def connect_to_cluster(address: str) -> None:
    """Join the Ray cluster at ``address`` before Flower would, handing every worker what a party reads.

    Workers on other nodes are started by their own raylet, not by this process: they inherit
    none of its environment. Flower's backend then finds Ray initialised and uses it. The run
    folder, the parties' folders and the data must be on a file system every node sees.
    """
    import ray

    names = (STATE_DIR_ENV, DATA_DIR_ENV, TORCH_THREADS_ENV)
    env_vars = {name: os.environ[name] for name in names if name in os.environ}
    env_vars["PYTHONPATH"] = os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
    if ray.is_initialized():  # a repetition before this one joined with its own party folders
        ray.shutdown()
    ray.init(address=address, runtime_env={"env_vars": env_vars}, include_dashboard=False)
