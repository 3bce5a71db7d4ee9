"""Run a scenario, continual or federated GAN, as a Flower simulation on Ray.

    python -m fedpsg.simulate --scenario split_fmnist --eps 10
    python -m fedpsg.simulate --scenario split_mnist --eps 1,10 --methods psg,dpsgd,dpmerf --out runs/mnist
    python -m fedpsg.simulate --scenario fed_gswgan_mnist --eps 10 --parties 50 --split by-class
    python -m fedpsg.simulate --scenario fed_gswgan_fmnist --methods fed-gswgan --set gan.rounds=1000

One virtual SuperNode per party. In a continual scenario (the default kind) the coordinator
(ServerApp) visits the parties stage by stage; results land in ``--out`` (default
``runs/<scenario>-eps<eps>``): results.csv, summary.json, accuracy.png, report.md, grids/, sets/,
config.json and run.log. In a federated GAN scenario (``kind: federated-gan``) all parties are
online at once and the ServerApp keeps the generator; results land in ``--out`` (default
``runs/<scenario>-<split>-<parties>p-eps<eps>``): results.csv, rounds.csv, privacy.json,
summary.json, accuracy.png, report.md, grids/, checkpoints/, config.json and run.log. Re-running
with the same ``--out`` resumes: finished stages and rounds are not redone. ``--repeats N`` runs N
independent repetitions in ``<out>/repeat-<r>`` (own public seed, fresh party secrets, own virtual
parties) and writes their means, 95% confidence intervals and paired differences in ``<out>``.

The virtual parties live in ``<out>/parties/party-<p>``: each has its own policy (written by the
simulation: its share of the data, the run's methods, each at most the run's epsilon, a lifetime
budget of one such run per method), its own lifetime ledger, which a resumed run continues, and
(federated GAN) its critics. Non-private requests (eps = inf, fedavg-gan) are refused unless
``--trust-coordinator``.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from pathlib import Path

from fedpsg.data.datasets import DataNotFoundError, load_images
from fedpsg.federated_gan.config import (
    DEFAULT_ROUND_TIMEOUT,
    METHODS,
    SPLITS,
    FedGANSettings,
    read_federated_scenario,
    resolve_federated_settings,
)
from fedpsg.federated_gan.config import KIND as FEDERATED_GAN
from fedpsg.runs.cli import (
    add_run_arguments,
    common_settings,
    positive_int,
    run_config_from_args,
    settings_from_args,
)
from fedpsg.runs.folder import ResumeMismatchError, check_resumable
from fedpsg.runs.repeats import repeat_settings, run_repeats
from fedpsg.runs.scenario import CONTINUAL, read_scenario, scenario_kind
from fedpsg.runs.settings import RunSettings
from fedpsg.simulation import (
    TRUST_HELP,
    SimulationResources,
    check_trust,
    place_repetitions,
    prepare_parties,
    simulate,
)

# Flags only one scenario kind reads: given for the other kind they are an error, not ignored.
ONLY_FOR = {
    CONTINUAL: ("--replay", "--stages", "--stage-timeout", "--reconnect-timeout", "--stage-retries"),
    FEDERATED_GAN: ("--parties", "--split", "--round-timeout"),
}
LOG_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")  # fedpsg.runs.folder.run_log's format
REPEATED_OUTPUTS = "results.csv, statistics.csv, summary.json, accuracy.png, report.md"
OUTPUTS = {  # what the closing line points to
    CONTINUAL: "results.csv, summary.json, accuracy.png, report.md, grids/",
    FEDERATED_GAN: "results.csv, rounds.csv, privacy.json, summary.json, accuracy.png, grids/",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedpsg.simulate",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    federated = parser.add_argument_group(
        "federated-gan scenarios",
        f"  kind: federated-gan (fed_gswgan_*): methods {', '.join(METHODS)}, one --eps.\n"
        "  --spc, --replay, --stages and the --stage-*/--reconnect-* flags are for continual scenarios only.",
    )
    federated.add_argument("--parties", type=positive_int, default=None, help="number of parties (SuperNodes)")
    federated.add_argument("--split", choices=SPLITS, default=None, help="how the training images are shared out")
    federated.add_argument(
        "--round-timeout",
        type=float,
        default=None,
        help=f"seconds to wait for a round's replies ({DEFAULT_ROUND_TIMEOUT:g})",
    )
    parser.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. 'auto')")
    parser.add_argument("--party-cpus", type=positive_int, default=1, help="Ray CPUs reserved per party (whole)")
    parser.add_argument("--party-gpus", type=float, default=None, help="Ray GPUs per party (default: 1 on CUDA)")
    parser.add_argument("--trust-coordinator", action="store_true", help=TRUST_HELP)
    return parser


def refuse_other_kinds_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, kind: str) -> None:
    """Raise on a flag of the other scenario kind (one set to anything but its default)."""
    for flags_kind, flags in ONLY_FOR.items():
        dests = {flag: flag.lstrip("-").replace("-", "_") for flag in flags}
        given = [f for f, dest in dests.items() if getattr(args, dest) != parser.get_default(dest)]
        if flags_kind != kind and given:
            verb = "is" if len(given) == 1 else "are"
            raise ValueError(f"{', '.join(given)} {verb} for {flags_kind} scenarios; {args.scenario} is a {kind} one")


def federated_settings_from_args(args: argparse.Namespace) -> FedGANSettings:
    """A federated GAN run's settings (one epsilon: its parties' noise is calibrated for one run)."""
    if args.eps is not None and len(args.eps) != 1:
        raise ValueError("a federated GAN run takes one --eps")
    if args.spc is not None:
        raise ValueError("--spc is for continual scenarios; set gan.samples_per_class for the evaluation sets")
    path, values = read_scenario(args.scenario)
    return resolve_federated_settings(
        read_federated_scenario(path, values),
        epsilon=args.eps[0] if args.eps else None,
        parties=args.parties,
        split=args.split,
        out=args.out,
        round_timeout=args.round_timeout if args.round_timeout is not None else DEFAULT_ROUND_TIMEOUT,
        **common_settings(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # An unknown kind takes the continual way, whose scenario loading refuses it with its name.
        kind = FEDERATED_GAN if scenario_kind(args.scenario) == FEDERATED_GAN else CONTINUAL
        refuse_other_kinds_flags(parser, args, kind)
        runs = [federated_settings_from_args(args)] if kind == FEDERATED_GAN else settings_from_args(args)
        for settings in runs:
            for repetition in repeat_settings(settings, args.repeats):
                check_resumable(repetition)
                check_trust(repetition, args.trust_coordinator)
    except (ValueError, ResumeMismatchError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpsg").setLevel(logging.INFO)  # Flower's import may have configured the root logger
    try:  # fail before starting Ray if the coordinator's test data is missing
        load_images(runs[0].scenario.dataset, train=False, data_dir=runs[0].data_dir)
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # A `kill` stops the run as Ctrl-C does: the runtime's processes stop with this one.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))

    def completed(settings: RunSettings | FedGANSettings, status: str) -> bool:
        if not (settings.out / "DONE").exists():
            log = settings.out / "run.log"
            errors = last_error(log.read_text()) if log.exists() else []
            where = f"{log} and the runtime's logs in {flower_logs(settings.out)}"
            print(f"error: the run did not complete ({status}); see {where}", *errors, sep="\n", file=sys.stderr)
            return False
        return True

    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    gpus = args.party_gpus if args.party_gpus is not None else (1.0 if runs[0].device.startswith("cuda") else 0.0)
    resources = SimulationResources(args.party_cpus, gpus, args.ray_address)

    def run_config(settings: RunSettings | FedGANSettings) -> dict:
        return run_config_from_args(args, out=settings.out.resolve(), data_dir=data_dir, epsilon=settings.epsilon)

    def run_one(settings: RunSettings | FedGANSettings) -> bool:
        """One run, or one repetition (its own folder and seed), on a runtime of its own."""
        config = {**run_config(settings), "seed": settings.seed, "repeats": 1}
        state_dir = prepare_parties(settings, args.trust_coordinator)
        status = simulate(config, settings.num_partitions, state_dir, flower_logs(settings.out), resources, data_dir)
        return completed(settings, status)

    def run_together(settings: RunSettings) -> bool:
        """Every repetition at once, each with nodes of its own; the ServerApp writes their joint outputs."""
        repetitions = repeat_settings(settings, args.repeats)
        config = {**run_config(settings), "repeats-together": True}
        state_dir = place_repetitions(repetitions, args.trust_coordinator)
        nodes = sum(r.num_partitions for r in repetitions)
        status = simulate(config, nodes, state_dir, flower_logs(settings.out), resources, data_dir)
        return all([completed(repetition, status) for repetition in repetitions])

    for settings in runs:
        if kind == CONTINUAL and args.repeats > 1:  # repetitions side by side in one simulation
            if not run_together(settings):
                return 1
        elif not run_repeats(settings, args.repeats, run_one):
            return 1
        outputs = OUTPUTS[kind] if args.repeats == 1 else f"{REPEATED_OUTPUTS} (and each repeat-<r>/)"
        print(f"results in {settings.out}: {outputs}")
    return 0


def last_error(log: str) -> list[str]:
    """The last ERROR record of a run log, all its lines (a party's reason can follow a traceback)."""
    records: list[list[str]] = []
    for line in log.splitlines():
        if LOG_RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    errors = [record for record in records if " ERROR " in record[0]]
    return errors[-1] if errors else []


def flower_logs(out: Path) -> Path:
    """Where the simulation runtime of a run in ``out`` keeps its logs and state."""
    return out / "flower"


if __name__ == "__main__":
    sys.exit(main())
