"""Utility per CPU-minute: accuracy of each synthesizer against its cost, on all classes at once.

    python bench/utility.py --datasets mnist fmnist --eps 1 10 --out runs/utility
    python bench/utility.py --methods psg --datasets mnist --eps 10 \\
        --grid 'psg: psg.iterations=5 | psg.iterations=10 psg.lr_images=1.0 | psg.iterations=20 psg.lr_images=1.0'

Every point runs one registered method on one party holding every class of the dataset
(spc images per class, the method's ``cpu`` profile plus the point's ``--set`` overrides),
then trains fresh classifiers on what it released, with the method's own ``cpu`` evaluation
(what the federated run uses: 300 epochs for a 10-per-class set, 40 for a generator's hundreds
per class), and tests them on the real test set. Writes ``utility.csv`` (one row per
point: method, dataset, eps, overrides, generation wall seconds, generation CPU seconds,
accuracy mean/std) and ``utility.png`` (accuracy vs generation seconds, one panel per dataset
and eps, with the published figures as reference lines). Run it on a quiet machine: it prints
the load average next to each point.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from fedpsg.data.datasets import ImageSet, dataset_spec, load_images  # noqa: E402
from fedpsg.methods import PartyStage, get_method, method_names  # noqa: E402
from fedpsg.nn.evaluation import evaluate_training_set, new_classifier  # noqa: E402
from fedpsg.runs.settings import method_sections, method_settings, parse_overrides, split_sections  # noqa: E402

# Published accuracies (%), 10 images per class, ConvNet, all 10 classes, by (dataset, eps).
PUBLISHED = {
    ("mnist", 10.0): {"PSG (paper, GPU)": 94.9},
    ("fmnist", 10.0): {"PSG (paper, GPU)": 75.6},
    ("mnist", 1.0): {"PSG (paper, GPU)": 80.9, "NDPDC": 93.1},
    ("fmnist", 1.0): {"PSG (paper, GPU)": 70.2, "NDPDC": 77.7},
}

# Default grid: the settings that matter at small budgets (method -> list of --set strings).
DEFAULT_GRID = {
    "psg": [
        "psg.iterations=5 psg.lr_images=1.0",
        "psg.iterations=10 psg.lr_images=0.1",
        "psg.iterations=10 psg.lr_images=1.0",
        "psg.iterations=20 psg.lr_images=1.0",
    ],
    "dpdm": ["dpdm.iterations=250", "dpdm.iterations=500", "dpdm.iterations=1000", "dpdm.iterations=2000"],
    "dpmerf": [
        "dpmerf.generator_steps=500 dpmerf.samples_per_class=300",
        "dpmerf.generator_steps=1500 dpmerf.samples_per_class=300",
        "dpmerf.generator_steps=3000 dpmerf.samples_per_class=1000",
    ],
}


def parse_grid(text: str | None) -> dict[str, list[str]]:
    """``'psg: a=1 | b=2; dpdm: c=3'`` -> ``{"psg": ["a=1", "b=2"], "dpdm": ["c=3"]}``."""
    if not text:
        return DEFAULT_GRID
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, points = part.partition(":")
        grid[method.strip()] = [p.strip() for p in points.split("|")]
    return grid


def run_point(
    method_name: str, overrides: str, dataset: str, epsilon: float, spc: int, data_dir: str | None, seed: int
) -> dict:
    method = get_method(method_name)
    spec = dataset_spec(dataset)
    classes = list(range(spec.num_classes))
    sections = split_sections(parse_overrides(overrides), method_sections([method_name]))
    config, evaluation = method_settings(method_name, "cpu", sections, spc)
    train = load_images(dataset, train=True, data_dir=data_dir)
    test = load_images(dataset, train=False, data_dir=data_dir)
    stage = PartyStage(
        data=train,
        classes=classes,
        spec=spec,
        epsilon=epsilon,
        delta=1e-5,
        seed=seed,
        model=new_classifier(spec, evaluation, seed),
        device="cpu",
        label=f"{method_name} {dataset} eps={epsilon:g} [{overrides}]",
        progress_interval=30.0,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    release = method.run(stage, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if release.images is None:  # a model release has no set to train on: test the model itself
        raise ValueError(f"{method_name} releases a model, not a synthetic set; the benchmark compares synthesizers")
    result = evaluate_training_set(ImageSet(release.images, release.labels), test, spec, evaluation, seed=seed)
    return {
        "method": method_name,
        "dataset": dataset,
        "eps": epsilon,
        "overrides": overrides,
        "generation_seconds": round(wall, 1),
        "generation_cpu_seconds": round(cpu, 1),
        "accuracy": round(100 * result.mean, 2),
        "accuracy_std": round(100 * result.std, 2),
        "images": len(release.labels),
        "load_average": round(os.getloadavg()[0], 2),
    }


# The setting each method's curve runs along; points that differ in anything else are other curves.
BUDGET_SETTING = {"psg": "psg.iterations", "dpdm": "dpdm.iterations", "dpmerf": "dpmerf.generator_steps"}


def _series(method: str, overrides: str) -> str:
    """The point's settings other than the method's budget setting (empty for the plain curve)."""
    budget = BUDGET_SETTING.get(method)
    return " ".join(item for item in overrides.split() if item.split("=")[0] != budget)


def plot(rows: list[dict], path: Path) -> None:
    # One curve per method along its budget setting; a point with other settings changed
    # (another image step, DSA, another evaluation...) is its own series, not a step of the curve.
    curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        key = (r["dataset"], r["eps"], r["method"], _series(r["method"], r["overrides"]))
        curves[key].append((r["generation_seconds"], r["accuracy"]))
    panels = sorted({(dataset, eps) for dataset, eps, _, _ in curves})
    # A method keeps its colour in every panel; its other series differ by marker.
    colours = {m: f"C{i}" for i, m in enumerate(sorted({m for _, _, m, _ in curves}))}
    markers = {s: "o" if not s else "s^Dv<>"[i % 6] for i, s in enumerate(sorted({s for *_, s in curves}))}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        dataset, eps = panel
        for (curve_dataset, curve_eps, method, series), points in sorted(curves.items()):
            if (curve_dataset, curve_eps) == panel:
                label = get_method(method).label + (f" [{series}]" if series else "")
                ax.plot(*zip(*sorted(points)), color=colours[method], marker=markers[series], label=label)
        for name, value in PUBLISHED.get((dataset, eps), {}).items():
            ax.axhline(value, linestyle="--", linewidth=1, color="grey")
            ax.text(0.01, value, name, fontsize=7, color="grey", va="bottom", transform=ax.get_yaxis_transform())
        ax.set_title(f"{dataset}, eps={eps:g}, all 10 classes, 10/class")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("generation wall time on this machine (s, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: those in the grid ({method_names()})")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fmnist"])
    parser.add_argument("--eps", nargs="+", type=float, default=[10.0, 1.0])
    parser.add_argument("--spc", type=int, default=10)
    parser.add_argument("--grid", default=None, help="'method: set ... | set ...; method: ...' (default: DEFAULT_GRID)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("runs/utility"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    methods = args.methods or [m for m in grid if m in method_names()]
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "utility.csv"
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    for row in rows:  # resume: finished points are kept
        for key in ("eps", "generation_seconds", "generation_cpu_seconds", "accuracy", "accuracy_std"):
            row[key] = float(row[key])
    done = {(r["method"], r["dataset"], r["eps"], r["overrides"]) for r in rows}
    for dataset in args.datasets:
        for epsilon in args.eps:
            for method in methods:
                for overrides in grid.get(method, [""]):
                    if (method, dataset, epsilon, overrides) in done:
                        continue
                    row = run_point(method, overrides, dataset, epsilon, args.spc, args.data_dir, args.seed)
                    rows.append(row)
                    print(
                        f"{method:7s} {dataset:6s} eps={epsilon:<4g} [{overrides}] {row['accuracy']:.1f}% "
                        f"in {row['generation_seconds']:.0f} s (load {row['load_average']})",
                        flush=True,
                    )
                    with table.open("w", newline="") as handle:
                        writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
                        writer.writeheader()
                        writer.writerows(rows)
                    plot(rows, args.out / "utility.png")
    print(f"wrote {table} and {args.out / 'utility.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
