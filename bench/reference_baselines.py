"""The baselines side by side with the PSG authors' code for them, at equal settings.

DP-SGD finetuning (their ``continual_learning/main_dpsgd.py``) and DP-Merf (``main_dpmerf.py``),
from the same checkout and Opacus 0.15 folder as ``bench/reference_psg.py`` (see there)::

    python bench/reference_baselines.py authors --method dpsgd --checkout /path/Private-Set \\
        --opacus /path/opacus015 --dataset mnist --profile cpu --eps 10 --out runs/reference/mnist/dpsgd-authors-1
    python bench/reference_baselines.py fedpsg --method dpsgd --dataset mnist --profile cpu --eps 10 \\
        --out runs/reference/mnist/dpsgd-fedpsg-1
    python bench/reference_baselines.py evaluate --checkout /path/Private-Set --opacus /path/opacus015 \\
        runs/reference/mnist/dpsgd-* runs/reference/mnist/dpmerf-*   # -> runs/reference/mnist/baselines.{csv,md}

``authors`` runs their script with the fedpsg profile's settings of the method: DP-SGD's epochs,
expected batch size, clipping bound and learning rate, the classifier's ConvNet width and depth
(patched into their ConvNet setting, as for PSG); DP-Merf's generator steps, batch, learning rate,
random features, latent size, samples per class and the evaluation's classifier. Their DP-Merf
keeps its generated sets in memory only: the harness keeps each stage's cumulative set (every
class seen so far) as their evaluation receives it. ``fedpsg`` runs fedpsg's coordinator on
in-process parties for that method alone (``--set`` for its settings: DP-Merf's authors use
replace-one adjacency, ``--set dpmerf.adjacency=replace-one`` for equal noise). ``evaluate`` reads
DP-SGD's per-stage accuracies (a model, evaluated as it is, by each side's own code) and
evaluates every DP-Merf run's cumulative sets with both protocols: fedpsg's (the method's
evaluation of the profile) and the authors' (their ``evaluate_synset`` for DP-Merf: 60 epochs,
their augmentation, a head of the seen classes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from reference_psg import (
    AUTHORS_NAMES,
    SCENARIOS,
    SIDE_FILE,
    _authors_environment,
    _authors_protocol,
    _data_root,
    _settings,
    comparison_table,
)

SCRIPTS = {"dpsgd": "main_dpsgd", "dpmerf": "main_dpmerf"}
DPMERF_EVALUATION_EPOCHS = 60  # main_dpmerf.py's evaluation (with its augmentation)


def _write_side(out: Path, side: str, args: argparse.Namespace, settings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "side": side,
        "method": args.method,
        "dataset": args.dataset,
        "profile": settings.profile,
        "epsilon": settings.epsilon,
        "delta": settings.delta,
        "stages": settings.stages,
        "config": asdict(settings.configs[args.method]),
        "evaluation": asdict(settings.evaluations[args.method]),
        "overrides": args.overrides,
    }
    (out / SIDE_FILE).write_text(json.dumps(record, indent=2))


# ----- the authors' side -----------------------------------------------------------------------


def _authors_argv(args: argparse.Namespace, settings, out: Path) -> list[str]:
    config, evaluation = settings.configs[args.method], settings.evaluations[args.method]
    argv = ["--exp_name", out.name, "--dataset", AUTHORS_NAMES[args.dataset], "--random_seed", str(args.seed)]
    argv += ["--data_root", str(_data_root(args.data_dir, args.dataset)), "--enable_privacy"]
    argv += ["--target_epsilon", str(settings.epsilon), "--target_delta", str(settings.delta)]
    if args.method == "dpsgd":
        return argv + [
            "--train_epoch", str(config.epochs), "--batch_size", str(config.batch_size), "--lr_net", str(config.lr),
            "--max_norm", str(config.max_grad_norm),
        ]  # fmt: skip
    return argv + [
        "--Iteration", str(config.generator_steps), "--batch_size", str(config.batch_size),
        "--lr_img", str(config.lr), "--d_rff", str(config.num_features), "--z_dim", str(config.latent_dim),
        "--num_samples", str(config.samples_per_class), "--num_eval", str(evaluation.num_evals),
    ]  # fmt: skip


def _differences(method: str, config) -> dict:
    """Settings fedpsg has that their script fixes: (ours, theirs)."""
    if method == "dpsgd":
        return {"momentum": (config.momentum, 0.0)}
    return {
        "adjacency": (config.adjacency, "replace-one"),
        "hidden_dim": (config.hidden_dim, 200),
        "lr_decay": (config.lr_decay, 0.9),
        "kernel_width": (config.kernel_width, None),
    }


def run_authors(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    settings = _settings(args, out, args.method)
    _write_side(out, "authors", args, settings)
    config, evaluation = settings.configs[args.method], settings.evaluations[args.method]
    for name, (ours, theirs) in _differences(args.method, config).items():
        if ours != theirs:
            print(f"note: {args.method}.{name}={ours!r} here; the authors' code has {theirs!r} (not settable there)")
    job = {
        "out": str(out),
        "script": SCRIPTS[args.method],
        "width": evaluation.width,
        "depth": evaluation.depth,
        "order": [c for classes in settings.stages for c in classes],
        "argv": _authors_argv(args, settings, out),
    }
    checkout = Path(args.checkout).resolve()
    subprocess.run(
        [sys.executable, __file__, "_authors_job", json.dumps(job)],
        cwd=checkout / "continual_learning",
        env=_authors_environment(checkout, Path(args.opacus).resolve()),
        check=True,
    )
    _collect_authors(out, checkout)


def _authors_job(job: dict) -> None:
    """Inside the authors' environment: their main() with the classifier's width, keeping DP-Merf's sets."""
    import importlib

    import utils.misc

    width, depth = job["width"], job["depth"]
    utils.misc.get_default_convnet_setting = lambda: (width, depth, "relu", "instancenorm", "avgpooling")
    script = importlib.import_module(job["script"])  # cwd: continual_learning
    if job["script"] == "main_dpmerf":
        sets = Path(job["out"]) / "sets"
        sets.mkdir(parents=True, exist_ok=True)
        evaluate_synset, order, seen = script.evaluate_synset, job["order"], set()

        def keeping_the_set(it_eval, net, images, labels, loader, args):
            # Called num_eval times per stage with that stage's cumulative set (labels: positions in order).
            stage = len(torch.unique(labels)) // 2
            if stage not in seen:
                classes = torch.tensor(order)[labels.cpu()]
                torch.save({"images": images.detach().cpu(), "labels": classes}, sets / f"cumulative{stage}.pt")
                seen.add(stage)
            return evaluate_synset(it_eval, net, images, labels, loader, args)

        script.evaluate_synset = keeping_the_set
    sys.argv = [f"{job['script']}.py", *job["argv"]]
    script.main()


def _collect_authors(out: Path, checkout: Path) -> None:
    """Their own per-stage accuracies (accs.yml, %) and log into the run folder."""
    import yaml

    side = json.loads((out / SIDE_FILE).read_text())
    folder = checkout / "continual_learning" / "results" / AUTHORS_NAMES[side["dataset"]] / out.name
    if (folder / "accs.yml").exists():
        accs = yaml.safe_load((folder / "accs.yml").read_text())
        values = accs if side["method"] == "dpsgd" else next(iter(accs.values()))
        own = {str(k + 1): float(v) / 100 for k, v in enumerate(values.values())}
        (out / "own_evaluation.json").write_text(json.dumps(own, indent=1))
    for name in ("log.txt", "log"):
        if (folder / name).exists():
            (out / "authors_log.txt").write_text((folder / name).read_text(errors="replace"))


# ----- fedpsg's side ---------------------------------------------------------------------------


def run_fedpsg(args: argparse.Namespace) -> None:
    from fedpsg.continual.coordinator import Coordinator
    from fedpsg.continual.local import LocalParties

    out = Path(args.out).resolve()
    settings = _settings(args, out, args.method)
    _write_side(out, "fedpsg", args, settings)
    Coordinator(settings).run(LocalParties(args.data_dir, state_dir=out / "parties"))
    _collect_fedpsg(out)


def _collect_fedpsg(out: Path) -> None:
    """The coordinator's per-stage accuracies, and (DP-Merf) each finished stage's cumulative set."""
    import pandas as pd

    side = json.loads((out / SIDE_FILE).read_text())
    if (out / "results.csv").exists():
        frame = pd.read_csv(out / "results.csv")
        own = {str(int(r.stage)): float(r.accuracy) for r in frame.itertuples()}
        (out / "own_evaluation.json").write_text(json.dumps(own, indent=1))
    images, labels = [], []
    for stage in range(1, 1 + len(side["stages"])):
        path = out / "sets" / side["method"] / f"stage{stage}.pt"
        if not path.exists():
            return
        released = torch.load(path, weights_only=False)
        images.append(released["images"])
        labels.append(released["labels"])
        torch.save({"images": torch.cat(images), "labels": torch.cat(labels)}, out / "sets" / f"cumulative{stage}.pt")


# ----- the table ---------------------------------------------------------------------------------


def _fedpsg_protocol(folder: Path, side: dict, stages: list[int], data_dir: str | None) -> list[float]:
    from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
    from fedpsg.nn.evaluation import EvalConfig, evaluate_training_set

    spec = dataset_spec(side["dataset"])
    test = load_images(spec.name, train=False, data_dir=data_dir)
    accuracies = []
    for stage in stages:
        seen = [c for classes in side["stages"][:stage] for c in classes]
        stored = torch.load(folder / "sets" / f"cumulative{stage}.pt", weights_only=False)
        result = evaluate_training_set(
            ImageSet(stored["images"], stored["labels"]),
            test.only_classes(seen),
            spec,
            EvalConfig(**side["evaluation"]),
        )
        accuracies.append(result.mean)
    return accuracies


def evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    rows = []
    for folder in map(Path, args.folders):
        if not (folder / SIDE_FILE).exists():
            continue
        side = json.loads((folder / SIDE_FILE).read_text())
        if side["side"] == "authors":
            _collect_authors(folder, Path(args.checkout).resolve())
        else:
            _collect_fedpsg(folder)
        own_path = folder / "own_evaluation.json"
        own = json.loads(own_path.read_text()) if own_path.exists() else {}
        done_path = folder / "evaluation.json"
        done = json.loads(done_path.read_text()) if done_path.exists() else {}
        if side["method"] == "dpmerf":  # its sets under both protocols, each stage once
            finished = [
                k for k in range(1, len(side["stages"]) + 1) if (folder / "sets" / f"cumulative{k}.pt").exists()
            ]
            new = [k for k in finished if str(k) not in done]
            if new and not args.own_only:
                psg_like = {**side, "spc": 10, "psg": {**side["evaluation"], "lr_net": side["evaluation"]["lr"]}}
                ours = _fedpsg_protocol(folder, side, new, args.data_dir)
                theirs = _authors_protocol(folder, psg_like, new, args, epochs=DPMERF_EVALUATION_EPOCHS)
                done.update({str(k): [a, b] for k, a, b in zip(new, ours, theirs)})
                done_path.write_text(json.dumps(done, indent=1))
        for stage, accuracy in own.items():
            pair = done.get(stage)
            rows.append(
                {
                    "method": side["method"], "run": folder.name, "side": side["side"], "stage": int(stage),
                    "own_eval": accuracy,
                    "fedpsg_eval": pair[0] if pair else None, "authors_eval": pair[1] if pair else None,
                }
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    target = Path(args.folders[0]).parent
    frame.to_csv(target / "baselines.csv", index=False)
    sections = []
    for method, group in frame.groupby("method"):
        own = group.assign(fedpsg_eval=group["own_eval"], authors_eval=group["own_eval"])
        sections.append(f"### {method}: each side's own evaluation\n\n" + _own_table(own))
        if group["fedpsg_eval"].notna().any():
            sections.append(f"### {method}: both protocols on both sides' sets\n\n" + comparison_table(group))
    (target / "baselines.md").write_text("\n".join(sections))
    print("\n".join(sections))


def _own_table(frame) -> str:
    lines = ["| stage | authors' code | fedpsg |", "|---|---|---|"]
    for stage, group in frame.groupby("stage"):
        cells = []
        for side in ("authors", "fedpsg"):
            values = 100 * group[group["side"] == side]["own_eval"]
            spread = f" ± {values.std():.1f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.1f}{spread} ({len(values)})" if len(values) else "")
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("authors", "fedpsg"):
        sub = commands.add_parser(name)
        sub.add_argument("--method", choices=sorted(SCRIPTS), required=True)
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
    commands.choices["evaluate"].add_argument("folders", nargs="+")
    commands.choices["evaluate"].add_argument("--data-dir", default=None)
    commands.choices["evaluate"].add_argument(
        "--own-only", action="store_true", help="each side's own evaluation only (DP-Merf: no cross-protocol runs)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_authors_job":
        return _authors_job(json.loads(argv[1]))
    args = build_parser().parse_args(argv)
    {"authors": run_authors, "fedpsg": run_fedpsg, "evaluate": evaluate}[args.command](args)


if __name__ == "__main__":
    main()
