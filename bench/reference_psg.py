"""PSG side by side with its authors' continual-learning code, at equal settings.

The authors' code (DingfanChen/Private-Set, ``continual_learning/main_ours.py``) needs Opacus
0.15; both live in folders of your own, nothing of theirs is copied into this repository::

    git clone https://github.com/DingfanChen/Private-Set /path/Private-Set
    pip install --no-deps --target /path/opacus015 opacus==0.15.0 progress  # progress: their baselines

Then, for each repeat (each side draws fresh randomness; the authors' code reseeds its networks
from the clock)::

    python bench/reference_psg.py authors --checkout /path/Private-Set --opacus /path/opacus015 \\
        --dataset mnist --profile cpu --eps 10 --out runs/reference/mnist/authors-1
    python bench/reference_psg.py fedpsg --dataset mnist --profile cpu --eps 10 \\
        --out runs/reference/mnist/fedpsg-1 [--set psg.init=torch ...]
    python bench/reference_psg.py evaluate --checkout /path/Private-Set --opacus /path/opacus015 \\
        runs/reference/mnist/*          # -> runs/reference/mnist/comparison.{csv,md}

``authors`` runs their loop with the fedpsg profile's PSG settings (R, T, K, J, B, C, spc, image
and network learning rates, the ConvNet's width and depth, DC or DSA) on their class order,
which is fedpsg's split_mnist / split_fmnist order. Their loop trains one pass more per stage
than its noise is calibrated for (``range(Iteration + 1)``); the harness runs it with
``--Iteration R-1`` and calibrates the noise for all R passes that then run, so their saved sets
are exactly R accounted passes, as fedpsg's. ``fedpsg`` runs fedpsg's coordinator on parties in
this process (the ClientApp's code path, no Flower) for PSG alone. ``evaluate`` trains fresh
classifiers on every stage's cumulative set (all classes seen so far) of every run folder with
both protocols: fedpsg's (``evaluate_training_set`` with the profile's evaluation) and the
authors' (their ``evaluate_synset``: 1000 epochs, their DC augmentation, a head of the seen
classes), and writes the per-stage table with the mean over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

# fedpsg is imported inside the functions that run here, never in the subprocesses that run the
# authors' code: there ``opacus`` must be their 0.15, and fedpsg imports the current one.

AUTHORS_NAMES = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
SCENARIOS = {"mnist": "split_mnist", "fmnist": "split_fmnist"}
SIDE_FILE = "side.json"  # what made a run folder: side, dataset, profile, settings


def _settings(args: argparse.Namespace, out: Path, method: str = "psg"):
    from fedpsg.runs.settings import resolve_settings

    settings = resolve_settings(
        SCENARIOS[args.dataset],
        epsilon=args.eps,
        profile=args.profile,
        seed=args.seed,
        out=out,
        methods=[method],
        data_dir=args.data_dir,
        overrides=args.overrides,
    )
    # The authors' parties hold every training image of their classes: no validation hold-out here.
    return replace(settings, scenario=replace(settings.scenario, validation_per_class=0))


def _write_side(out: Path, side: str, args: argparse.Namespace, settings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "side": side,
        "dataset": args.dataset,
        "profile": settings.profile,
        "epsilon": settings.epsilon,
        "delta": settings.delta,
        "spc": settings.scenario.spc,
        "stages": settings.stages,
        "psg": asdict(settings.configs["psg"]),
        "evaluation": asdict(settings.evaluations["psg"]),
        "overrides": args.overrides,
    }
    (out / SIDE_FILE).write_text(json.dumps(record, indent=2))


# ----- the authors' side -----------------------------------------------------------------------


def _authors_environment(checkout: Path, opacus: Path) -> dict[str, str]:
    paths = [str(opacus), str(checkout), str(checkout / "continual_learning")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONWARNINGS": "ignore"}


def _data_root(data_dir: str | None, dataset: str) -> Path:
    """Their code reads ``<data_root>/<Name>/<Name>/raw``; fedpsg's data folder holds ``<Name>/raw``."""
    source = Path(data_dir or os.environ.get("FEDPSG_DATA_DIR", "data")).resolve()
    root = Path("runs/reference/.authors-data").resolve()
    link = root / AUTHORS_NAMES[dataset]
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source)
    return root


def run_authors(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    settings = _settings(args, out)
    config = settings.configs["psg"]
    if config.iterations < 2:
        raise SystemExit("the authors' loop needs R >= 2 (it runs R-1 + 1 passes)")
    _write_side(out, "authors", args, settings)
    job = {
        "out": str(out),
        "width": config.width,
        "depth": config.depth,
        "iterations": config.iterations,
        "argv": [
            "--exp_name",
            out.name,
            "--dataset",
            AUTHORS_NAMES[args.dataset],
            "--data_root",
            str(_data_root(args.data_dir, args.dataset)),
            "--random_seed",
            str(args.seed),
            "--num_eval",
            str(settings.evaluations["psg"].num_evals),
            "--method",
            "DSA" if config.augment else "DC",
            "--spc",
            str(settings.scenario.spc),
            "--Iteration",
            str(config.iterations - 1),
            "--outer_loop",
            str(config.outer_loop),
            "--inner_loop",
            str(config.inner_loop),
            "--batch_loop",
            str(config.batch_loop),
            "--lr_img",
            str(config.lr_images),
            "--lr_net",
            str(config.lr_net),
            "--batch_real",
            str(config.batch_size),
            "--max_norm",
            str(config.max_grad_norm),
            "--enable_privacy",
            "--target_epsilon",
            str(settings.epsilon),
            "--target_delta",
            str(settings.delta),
        ],  # fmt: skip
    }
    differences = {
        "momentum_images": (config.momentum_images, 0.5),
        "init": (config.init, "torch"),
        "inner_on_all_sets": (config.inner_on_all_sets, True),
    }
    for name, (ours, theirs) in differences.items():
        if ours != theirs:
            print(f"note: psg.{name}={ours!r} here; the authors' code has {theirs!r} (not settable there)")
    checkout = Path(args.checkout).resolve()
    subprocess.run(
        [sys.executable, __file__, "_authors_job", json.dumps(job)],
        cwd=checkout / "continual_learning",
        env=_authors_environment(checkout, Path(args.opacus).resolve()),
        check=True,
    )
    _collect_authors(out, checkout)
    print(f"the authors' sets in {out / 'sets'}")


def _authors_job(job: dict) -> None:
    """Inside the authors' environment: their main() with the width and the extra pass accounted."""
    import main_ours  # their module (cwd: continual_learning)
    import utils.misc

    width, depth, iterations = job["width"], job["depth"], job["iterations"]
    utils.misc.get_default_convnet_setting = lambda: (width, depth, "relu", "instancenorm", "avgpooling")
    calibrate = main_ours.compute_sigma

    def all_passes(epsilon: float, rate: float, steps: int, delta: float) -> float:
        # main() asks for T K steps; R T K run. Calibrate for what runs.
        return calibrate(epsilon, rate, steps * iterations // (iterations - 1), delta)

    main_ours.compute_sigma = all_passes
    sys.argv = ["main_ours.py", *job["argv"]]
    main_ours.main()


def _collect_authors(out: Path, checkout: Path) -> None:
    """Each finished stage's cumulative set (every class seen so far) from their results file.

    Their loop saves the whole synthetic tensor after every stage, so a run still going (or
    stopped) gives its finished stages.
    """
    side = json.loads((out / SIDE_FILE).read_text())
    folder = checkout / "continual_learning" / "results" / AUTHORS_NAMES[side["dataset"]] / out.name
    found = sorted(folder.glob("res_*.pt"))
    if not found:
        return
    result = torch.load(found[0], weights_only=False)
    (out / "sets").mkdir(parents=True, exist_ok=True)
    for stage, (images, labels) in enumerate(result["data"], start=1):
        seen = torch.tensor([c for classes in side["stages"][:stage] for c in classes])
        keep = torch.isin(labels, seen)
        torch.save({"images": images[keep], "labels": labels[keep]}, out / "sets" / f"cumulative{stage}.pt")
    if (folder / "log.txt").exists():
        (out / "authors_log.txt").write_text((folder / "log.txt").read_text(errors="replace"))


# ----- fedpsg's side ---------------------------------------------------------------------------


def run_fedpsg(args: argparse.Namespace) -> None:
    from fedpsg.continual.coordinator import Coordinator
    from fedpsg.continual.local import LocalParties

    out = Path(args.out).resolve()
    settings = _settings(args, out)
    _write_side(out, "fedpsg", args, settings)
    Coordinator(settings).run(LocalParties(args.data_dir, state_dir=out / "parties"))
    _collect_fedpsg(out)


def _collect_fedpsg(out: Path) -> None:
    """Each finished stage's cumulative set: the union of the sets the parties released so far."""
    images, labels = [], []
    for stage in range(1, 1 + len(json.loads((out / SIDE_FILE).read_text())["stages"])):
        path = out / "sets" / "psg" / f"stage{stage}.pt"
        if not path.exists():
            return
        released = torch.load(path, weights_only=False)
        images.append(released["images"])
        labels.append(released["labels"])
        torch.save({"images": torch.cat(images), "labels": torch.cat(labels)}, out / "sets" / f"cumulative{stage}.pt")


# ----- both protocols on both sides' sets --------------------------------------------------------


def _finished_stages(folder: Path, side: dict, most: int | None) -> int:
    count = 0
    while count < len(side["stages"]) and (folder / "sets" / f"cumulative{count + 1}.pt").exists():
        count += 1
    return min(count, most) if most else count


def _fedpsg_protocol(folder: Path, side: dict, stages: list[int], data_dir: str | None) -> list[float]:
    from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
    from fedpsg.nn.evaluation import EvalConfig, evaluate_training_set

    spec = dataset_spec(side["dataset"])
    test = load_images(spec.name, train=False, data_dir=data_dir)
    evaluation = EvalConfig(**side["evaluation"])
    accuracies = []
    for stage in stages:
        seen = [c for classes in side["stages"][:stage] for c in classes]
        stored = torch.load(folder / "sets" / f"cumulative{stage}.pt", weights_only=False)
        result = evaluate_training_set(
            ImageSet(stored["images"], stored["labels"]), test.only_classes(seen), spec, evaluation
        )
        accuracies.append(result.mean)
    return accuracies


def _authors_protocol(
    folder: Path, side: dict, stages: list[int], args: argparse.Namespace, epochs: int = 1000
) -> list[float]:
    """Their ``evaluate_synset`` (``epochs``: 1000 for PSG's sets, as their main_ours.py) on each stage's set."""
    checkout = Path(args.checkout).resolve()
    job = {
        "epochs": epochs,
        "folder": str(folder.resolve()),
        "dataset": AUTHORS_NAMES[side["dataset"]],
        "data_root": str(_data_root(args.data_dir, side["dataset"])),
        "stages": side["stages"],
        "evaluate": stages,
        "spc": side["spc"],
        "width": side["psg"]["width"],
        "depth": side["psg"]["depth"],
        "lr_net": side["psg"]["lr_net"],
        "num_eval": side["evaluation"]["num_evals"],
    }
    result = subprocess.run(
        [sys.executable, __file__, "_authors_evaluation", json.dumps(job)],
        cwd=checkout / "continual_learning",
        env=_authors_environment(checkout, Path(args.opacus).resolve()),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _authors_evaluation(job: dict) -> None:
    """Inside the authors' environment: their evaluate_synset on each stage's cumulative set."""
    import numpy as np
    import utils.misc
    from utils.ops import evaluate_synset

    width, depth = job["width"], job["depth"]
    utils.misc.get_default_convnet_setting = lambda: (width, depth, "relu", "instancenorm", "avgpooling")
    channel, im_size, _, _, _, _, _, dst_test, _ = utils.misc.get_dataset(
        job["dataset"], str(Path(job["data_root"]) / job["dataset"])
    )
    order = [c for classes in job["stages"] for c in classes]
    args = argparse.Namespace(
        device="cpu", lr_net=job["lr_net"], batch_train=256, dsa=False, epoch_eval_train=job["epochs"],
        dc_aug_param=utils.misc.get_daparam(job["dataset"], "ConvNet", "ConvNet", job["spc"]),
    )  # fmt: skip
    targets = np.asarray(dst_test.targets)
    means = []
    for stage in job["evaluate"]:
        seen = order[: 2 * stage]
        stored = torch.load(Path(job["folder"]) / "sets" / f"cumulative{stage}.pt", weights_only=False)
        mapped = torch.tensor([order.index(int(c)) for c in stored["labels"]])
        keep = np.isin(targets, seen)
        test = torch.utils.data.TensorDataset(
            torch.stack([dst_test[i][0] for i in np.flatnonzero(keep)]),
            torch.tensor([order.index(int(c)) for c in targets[keep]]),
        )
        loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False)
        accuracies = []
        for run in range(job["num_eval"]):
            net = utils.misc.get_network("ConvNet", channel, len(seen), im_size)
            accuracies.append(evaluate_synset(run, net, stored["images"], mapped, loader, args)[2])
        means.append(float(np.mean(accuracies)))
    print(json.dumps(means))


def evaluate(args: argparse.Namespace) -> None:
    rows = []
    for folder in map(Path, args.folders):
        if not (folder / SIDE_FILE).exists():
            continue
        side = json.loads((folder / SIDE_FILE).read_text())
        if side["side"] == "authors":
            _collect_authors(folder, Path(args.checkout).resolve())
        else:
            _collect_fedpsg(folder)
        # Each stage's two evaluations are kept in the folder: a later call evaluates only new stages.
        done_path = folder / "evaluation.json"
        done = json.loads(done_path.read_text()) if done_path.exists() else {}
        new = [k for k in range(1, _finished_stages(folder, side, args.stages) + 1) if str(k) not in done]
        if new:
            ours = _fedpsg_protocol(folder, side, new, args.data_dir)
            theirs = _authors_protocol(folder, side, new, args)
            done.update({str(k): [a, b] for k, a, b in zip(new, ours, theirs)})
            done_path.write_text(json.dumps(done, indent=1))
        for stage, (a, b) in sorted(done.items(), key=lambda item: int(item[0])):
            rows.append(
                {"run": folder.name, "side": variant(side), "stage": int(stage), "fedpsg_eval": a, "authors_eval": b}
            )
        print(folder.name, side["side"], {k: [round(100 * v, 1) for v in pair] for k, pair in done.items()})
    import pandas as pd

    frame = pd.DataFrame(rows)
    target = Path(args.folders[0]).parent
    frame.to_csv(target / "comparison.csv", index=False)
    table = comparison_table(frame)
    (target / "comparison.md").write_text(table)
    print(table)


def variant(side: dict) -> str:
    """A side and its factor: runs with the same overrides are repeats of one another."""
    overrides = " ".join(side.get("overrides") or [])
    return f"{side['side']} {overrides}" if overrides else side["side"]


def comparison_table(frame) -> str:
    """Markdown: one row per stage, mean ± std (runs) of each side under each protocol, in %."""
    cells = {}
    for (side, stage), group in frame.groupby(["side", "stage"]):
        for protocol in ("fedpsg_eval", "authors_eval"):
            values = 100 * group[protocol]
            spread = f" ± {values.std():.1f}" if len(values) > 1 else ""
            cells[(stage, f"{side}, {protocol.replace('_eval', '')} evaluation")] = (
                f"{values.mean():.1f}{spread} ({len(values)})"
            )
    columns = sorted({column for _, column in cells})
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage in sorted({stage for stage, _ in cells}):
        lines.append(f"| {stage} | " + " | ".join(cells.get((stage, c), "") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("authors", "fedpsg"):
        sub = commands.add_parser(name)
        sub.add_argument("--dataset", choices=sorted(SCENARIOS), default="mnist")
        sub.add_argument("--profile", default="cpu")
        sub.add_argument("--eps", type=float, default=10.0)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", required=True)
        sub.add_argument("--data-dir", default=None)
        sub.add_argument("--set", dest="overrides", action="append", default=[], help="fedpsg override, KEY=VALUE")
    for sub in (commands.choices["authors"], commands.add_parser("evaluate")):
        sub.add_argument("--checkout", required=True, help="a checkout of DingfanChen/Private-Set")
        sub.add_argument("--opacus", required=True, help="a folder with opacus 0.15 (pip install --target)")
    evaluate_parser = commands.choices["evaluate"]
    evaluate_parser.add_argument("folders", nargs="+")
    evaluate_parser.add_argument("--data-dir", default=None)
    evaluate_parser.add_argument("--stages", type=int, default=None, help="evaluate at most this many stages")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_authors_job":
        return _authors_job(json.loads(argv[1]))
    if argv and argv[0] == "_authors_evaluation":
        return _authors_evaluation(json.loads(argv[1]))
    args = build_parser().parse_args(argv)
    {"authors": run_authors, "fedpsg": run_fedpsg, "evaluate": evaluate}[args.command](args)


if __name__ == "__main__":
    main()
