"""How many threads a job should get: one job with every core, or one single-threaded job per core.

    python bench/threads_per_job.py [--dataset fmnist] [--iterations 2] [--cores 2]

The job is a real PSG party stage at the ``cpu`` profile (stage 3: its two classes' private
images, the two earlier stages' sets as stand-ins), cut to ``--iterations`` of its 10 runs, and
then the coordinator's evaluation of its replay set. Two ways to do ``--cores`` such jobs:

- one after another, each with ``--cores`` torch threads (the run before its job graph);
- side by side, one process per job, each with one thread (the job graph's simulation).

Prints both wall times and their ratio (above 1: side by side is faster) with the load average
before and after. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def job(args: argparse.Namespace) -> dict:
    from fedpsg.data.datasets import DEFAULT_VALIDATION_PER_CLASS, ImageSet, dataset_spec, load_split
    from fedpsg.methods import PartyStage, get_method
    from fedpsg.nn.evaluation import evaluate_training_set, new_classifier
    from fedpsg.runs.scenario import load_scenario
    from fedpsg.runs.settings import method_settings

    torch.set_num_threads(args.threads)
    spec = dataset_spec(args.dataset)
    stages = load_scenario(f"split_{args.dataset}").stages
    classes, earlier_classes = stages[2], [c for stage in stages[:2] for c in stage]
    config, evaluation = method_settings("psg", "cpu", {"psg": {"iterations": args.iterations}}, spc=10)

    def split(name: str) -> ImageSet:
        return load_split(args.dataset, name, validation_per_class=DEFAULT_VALIDATION_PER_CLASS, data_dir=args.data_dir)

    train, test = split("private").only_classes(classes), split("test")
    labels = torch.tensor(earlier_classes).repeat_interleave(config.spc)
    earlier = ImageSet(torch.randn(len(labels), spec.channels, *spec.image_size), labels)
    stage = PartyStage(
        data=train, classes=classes, spec=spec, epsilon=10.0, delta=1e-5, seed=0,
        model=new_classifier(spec, evaluation, 0), label="job", progress_interval=1e9, earlier=earlier,
    )  # fmt: skip
    started = time.perf_counter()
    release = get_method("psg").run(stage, config)
    party = time.perf_counter() - started
    replay = ImageSet(torch.cat([earlier.images, release.images]), torch.cat([earlier.labels, release.labels]))
    started = time.perf_counter()
    evaluate_training_set(replay, test.only_classes(earlier_classes + classes), spec, evaluation)
    return {"party_seconds": party, "evaluation_seconds": time.perf_counter() - started}


def spawn(args: argparse.Namespace, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--job", "--threads", str(threads), "--dataset", args.dataset]
    command += ["--iterations", str(args.iterations)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fmnist", choices=["mnist", "fmnist"])
    parser.add_argument("--iterations", type=int, default=2, help="PSG runs of the job (the cpu profile has 10)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        print(json.dumps(job(args)))
        return
    print(f"{args.cores} PSG jobs ({args.dataset}, stage 3, cpu profile, {args.iterations} runs) + their evaluations")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    serial = [json.loads(spawn(args, args.cores).communicate()[0].splitlines()[-1]) for _ in range(args.cores)]
    one_after_another = time.perf_counter() - started
    started = time.perf_counter()
    processes = [spawn(args, 1) for _ in range(args.cores)]
    side = [json.loads(p.communicate()[0].splitlines()[-1]) for p in processes]
    side_by_side = time.perf_counter() - started
    for name, results, wall in [(f"one after another, {args.cores} threads each", serial, one_after_another),
                                ("side by side, 1 thread each", side, side_by_side)]:  # fmt: skip
        party = ", ".join(f"{r['party_seconds']:.0f}" for r in results)
        evaluation = ", ".join(f"{r['evaluation_seconds']:.0f}" for r in results)
        print(f"{name:<40} wall {wall:6.0f} s (party {party} s; evaluation {evaluation} s)")
    print(f"side by side is {one_after_another / side_by_side:.2f}x the throughput")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
