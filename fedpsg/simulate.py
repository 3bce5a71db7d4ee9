"""Run a federated continual-learning scenario as a Flower simulation on Ray.

    python -m fedpsg.simulate --scenario split_fmnist --eps 10
    python -m fedpsg.simulate --scenario fed_gswgan_mnist --eps 10   (fedpsg.federated_gan.cli)

One virtual SuperNode per party; the coordinator (ServerApp) visits them stage by stage.
Results land in ``--out`` (default ``runs/<scenario>-eps<eps>``): results.csv, summary.json,
accuracy.png, report.md, grids/, sets/, config.json and run.log. Re-running with the same
``--out`` resumes: finished stages are not redone.

The virtual parties live in ``<out>/parties/party-<p>``: each has its own policy (written by the
simulation: its share of the data, the run's methods, each at most the run's epsilon, a lifetime
budget of one such run per method) and its own lifetime ledger, which a resumed run continues.
Non-private requests (eps = inf, fedavg-gan) are refused unless ``--trust-coordinator``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fedpsg.continual.coordinator import check_resumable
from fedpsg.data.datasets import DataNotFoundError, load_images
from fedpsg.federated_gan.cli import main as federated_main
from fedpsg.federated_gan.config import KIND as FEDERATED_GAN
from fedpsg.runs.cli import add_run_arguments, settings_from_args
from fedpsg.runs.folder import ResumeMismatchError
from fedpsg.runs.scenario import scenario_kind
from fedpsg.simulation import TRUST_HELP, check_trust, simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.simulate", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. 'auto')")
    parser.add_argument("--party-cpus", type=float, default=1.0, help="Ray CPUs reserved per party")
    parser.add_argument("--party-gpus", type=float, default=None, help="Ray GPUs per party (default: 1 on CUDA)")
    parser.add_argument("--trust-coordinator", action="store_true", help=TRUST_HELP)
    return parser


def _federated_gan_scenario(argv: list[str] | None) -> bool:
    """Whether ``--scenario`` names a federated-gan scenario (an unknown one is reported later)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--scenario", default=None)
    known, _ = peek.parse_known_args(argv)
    try:
        return known.scenario is not None and scenario_kind(known.scenario) == FEDERATED_GAN
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    if _federated_gan_scenario(argv):
        return federated_main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = settings_from_args(args)
        for settings in runs:
            check_resumable(settings)
            check_trust(settings, args.trust_coordinator)
    except (ValueError, ResumeMismatchError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # fail before starting Ray if the coordinator's test data is missing
        load_images(runs[0].scenario.dataset, train=False, data_dir=runs[0].data_dir)
    except DataNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for settings in runs:
        simulate(settings, args.ray_address, args.party_cpus, args.party_gpus, args.trust_coordinator)
        if not (settings.out / "DONE").exists():
            log = settings.out / "run.log"
            errors = [line for line in log.read_text().splitlines() if " ERROR " in line] if log.exists() else []
            print(f"error: the run did not complete; see {log}", *errors[-1:], sep="\n", file=sys.stderr)
            return 1
        print(f"results in {settings.out}: results.csv, summary.json, accuracy.png, report.md, grids/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
