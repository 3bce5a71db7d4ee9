"""``python -m fedpsg.simulate --scenario fed_gswgan_mnist --eps 10``: a federated GAN scenario on Flower's simulation.

    python -m fedpsg.simulate --scenario fed_gswgan_mnist --eps 10 --parties 50 --split by-class
    python -m fedpsg.simulate --scenario fed_gswgan_fmnist --methods fed-gswgan --set gan.rounds=1000

One virtual SuperNode per party, all online at once; the ServerApp keeps the generator. Results
land in ``--out`` (default ``runs/<scenario>-<split>-<parties>p-eps<eps>``); re-running with the
same ``--out`` resumes after the last finished round. The simulated parties keep their policies,
critics and lifetime ledgers under ``<out>/parties`` (in a deployment: each SuperNode's own disk);
fedavg-gan is not private, so it runs only with ``--trust-coordinator``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fedpsg.data.datasets import DataNotFoundError, load_images
from fedpsg.federated_gan.config import (
    METHODS,
    SPLITS,
    FedGANSettings,
    read_federated_scenario,
    resolve_federated_settings,
)
from fedpsg.federated_gan.coordinator import FedGANRun
from fedpsg.runs.cli import add_common_arguments, positive_int
from fedpsg.runs.folder import ResumeMismatchError
from fedpsg.runs.scenario import read_scenario
from fedpsg.simulation import TRUST_HELP, check_trust, simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", required=True, help="a federated-gan scenario (scenarios/fed_gswgan_*.yaml)")
    add_common_arguments(parser)
    parser.add_argument("--parties", type=positive_int, default=None, help="number of parties (SuperNodes)")
    parser.add_argument("--split", choices=SPLITS, default=None, help="how the training images are shared out")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--out", default=None, help="output folder (re-use it to resume)")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for a round's replies")
    parser.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. 'auto')")
    parser.add_argument("--party-cpus", type=float, default=1.0, help="Ray CPUs reserved per party")
    parser.add_argument("--trust-coordinator", action="store_true", help=TRUST_HELP)
    return parser


def settings_from_args(args: argparse.Namespace) -> FedGANSettings:
    if args.eps is not None and len(args.eps) != 1:
        raise ValueError("a federated GAN run takes one --eps")
    if args.spc is not None:
        raise ValueError("--spc is for continual scenarios; set gan.samples_per_class for the evaluation sets")
    path, values = read_scenario(args.scenario)
    return resolve_federated_settings(
        read_federated_scenario(path, values),
        epsilon=args.eps[0] if args.eps else None,
        delta=args.delta,
        parties=args.parties,
        split=args.split,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
        profile=args.profile,
        seed=args.seed,
        device=args.device,
        out=args.out,
        data_dir=args.data_dir,
        round_timeout=args.round_timeout,
        overrides=args.overrides,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        test = load_images(settings.scenario.dataset, train=False, data_dir=settings.data_dir)
        FedGANRun(settings, test)  # checks a resumed folder's settings before Ray starts
        check_trust(settings, args.trust_coordinator)
    except (ValueError, ResumeMismatchError) as err:
        parser.error(str(err))
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    simulate(settings, args.ray_address, args.party_cpus, trust_coordinator=args.trust_coordinator)
    if not (settings.out / "DONE").exists():
        print(f"error: the run did not complete; see {settings.out / 'run.log'}", file=sys.stderr)
        return 1
    print(f"results in {settings.out}: results.csv, rounds.csv, privacy.json, summary.json, accuracy.png, grids/")
    return 0
