"""Where a PSG stage's time goes: one real party stage at a profile, split into its phases.

    python bench/profile_psg_stage.py --dataset fmnist --stage 5 [--profile cpu] [--threads 1]

Runs the party of stage ``--stage`` of the split scenario (its two classes, its real training
images, the earlier stages' sets as N(0, 1) stand-ins of the same size, so the inner loop trains
on as many images as in the main job), then the coordinator's evaluation of the replay set.
The phases are the ``record_function`` labels in :mod:`fedpsg.methods.psg` (DP real-gradient
steps, synthetic-set matching steps, inner-loop training), read with torch's profiler; the stage
runs once more without the profiler to measure the profiler's own overhead. Prints the load
average: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.methods import PartyStage, get_method
from fedpsg.nn.evaluation import evaluate_training_set, new_classifier
from fedpsg.runs.scenario import load_scenario
from fedpsg.runs.settings import method_settings

PHASES = ("psg.dp_real_gradient", "psg.synthetic_step", "psg.inner_loop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fmnist", choices=["mnist", "fmnist"])
    parser.add_argument("--stage", type=int, default=5, help="1-5: which party's stage (later = more earlier sets)")
    parser.add_argument("--profile", default="cpu", choices=["paper", "cpu", "tiny"])
    parser.add_argument("--eps", type=float, default=10.0)
    parser.add_argument("--iterations", type=int, help="override psg.iterations (e.g. to sample the paper profile)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scenario = load_scenario(f"split_{args.dataset}")
    spec = dataset_spec(args.dataset)
    classes = scenario.stages[args.stage - 1]
    earlier_classes = [c for stage in scenario.stages[: args.stage - 1] for c in stage]
    sections = {"psg": {"iterations": args.iterations}} if args.iterations else {}
    config, evaluation = method_settings("psg", args.profile, sections, spc=10)
    train = load_images(args.dataset, train=True, data_dir=args.data_dir).only_classes(classes)
    test = load_images(args.dataset, train=False, data_dir=args.data_dir)
    generator = torch.Generator().manual_seed(0)
    earlier = None
    if earlier_classes:
        labels = torch.tensor(earlier_classes).repeat_interleave(config.spc)
        earlier = ImageSet(torch.randn(len(labels), spec.channels, *spec.image_size, generator=generator), labels)

    def party_stage() -> PartyStage:
        return PartyStage(
            data=train,
            classes=classes,
            spec=spec,
            epsilon=args.eps,
            delta=1e-5,
            seed=0,
            model=new_classifier(spec, evaluation, 0),
            label=f"psg {args.dataset} stage {args.stage}",
            progress_interval=60.0,
            earlier=earlier,
        )

    load = os.getloadavg()[0]
    print(f"PSG stage {args.stage} of split_{args.dataset}, profile {args.profile}, {config}")
    print(f"{args.threads} torch threads, n = {len(train)}, load average {load:.2f}")
    method = get_method("psg")

    start = time.perf_counter()
    method.run(party_stage(), config)
    plain = time.perf_counter() - start

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        release = method.run(party_stage(), config)
        profiled = time.perf_counter() - start
    phase_seconds = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PHASES}

    replay = ImageSet(release.images, release.labels)
    if earlier is not None:
        replay = ImageSet(torch.cat([earlier.images, release.images]), torch.cat([earlier.labels, release.labels]))
    start = time.perf_counter()
    evaluate_training_set(replay, test.only_classes(earlier_classes + classes), spec, evaluation)
    evaluating = time.perf_counter() - start

    # The profiler stretches every phase by about the same factor; scale back to the plain run.
    scale = plain / profiled
    rows = [(name.removeprefix("psg."), seconds * scale) for name, seconds in phase_seconds.items()]
    rows.append(("other (batches, setup)", plain - sum(seconds for _, seconds in rows)))
    rows.append((f"evaluation ({evaluation.num_evals} x {evaluation.epochs} epochs)", evaluating))
    total = plain + evaluating
    print(f"\nparty run {plain:.1f} s without profiler, {profiled:.1f} s with (overhead x{profiled / plain:.2f})")
    print(f"{'phase':<40} {'seconds':>8} {'share':>6}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:8.1f} {100 * seconds / total:5.1f}%")
    print(f"{'total (party + evaluation)':<40} {total:8.1f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
