"""Utility per CPU-minute: accuracy of each synthesizer against its cost, on all classes at once.

    python bench/utility.py --datasets mnist fmnist --eps 1 10 --out runs/utility
    python bench/utility.py --methods psg --datasets mnist --eps 10 \\
        --grid 'psg: psg.iterations=5 | psg.iterations=10 psg.lr_images=1.0 | psg.iterations=20 psg.lr_images=1.0'

Every point runs one registered method on one party holding every class of the dataset
(spc images per class, the method's ``cpu`` profile plus the point's ``--set`` overrides),
then trains fresh classifiers on what it released, with the method's own ``cpu`` evaluation
(what the federated run uses: 300 epochs for a 10-per-class set, 40 for a generator's hundreds
per class; a fixed number of epochs, no classifier or epoch is picked), and tests them on the
**validation split**: the evaluator's 500 training images per class that no party holds
(``fedpsg.data.datasets.load_split``). The party holds the rest of the training split.

Selection never sees the test images: once every point of a (method, dataset, eps) group is
done, the point with the best validation accuracy is chosen, and only that point's release is
tested on the test split (fresh classifiers, same seeds). Writes ``utility.csv`` (one row per
point: method, dataset, eps, overrides, generation wall / CPU seconds, validation accuracy
mean/std, and, on the chosen row only, the test accuracy and the reversed utility real2gen:
classifiers trained on the validation images, tested on the release), ``releases/`` (each point's DP
release, so that the chosen one can be tested) and ``utility.png`` (validation accuracy vs
generation seconds, one panel per dataset and eps, the chosen point's test accuracy as a star,
the published test figures as reference lines). Run it on a quiet machine: it prints the load
average next to each point.
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

from fedpsg.data.datasets import DEFAULT_VALIDATION_PER_CLASS, ImageSet, dataset_spec, load_split  # noqa: E402
from fedpsg.methods import PartyStage, get_method, method_names  # noqa: E402
from fedpsg.nn.evaluation import (  # noqa: E402
    REAL_CLASSIFIERS,
    evaluate_training_set,
    new_classifier,
    real_classifiers,
    reversed_utility,
)
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
    "dpmepf": ["dpmepf.moments=first", "dpmepf.moments=first-and-second"],
    # The full method and the poster's ablations (w/o g2r, w/o r2g, w/o sequential training).
    "dpac": ["dpac.sequential=true", "dpac.g2r_weight=0", "dpac.r2g_weight=0", "dpac.sequential=false"],
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


def _evaluation(method_name: str, overrides: str, spc: int):
    sections = split_sections(parse_overrides(overrides), method_sections([method_name]))
    return method_settings(method_name, "cpu", sections, spc)


def _split(dataset: str, split: str, data_dir: str | None) -> ImageSet:
    return load_split(dataset, split, validation_per_class=DEFAULT_VALIDATION_PER_CLASS, data_dir=data_dir)


def run_point(
    method_name: str,
    overrides: str,
    dataset: str,
    epsilon: float,
    spc: int,
    data_dir: str | None,
    seed: int,
    release_path: Path,
) -> dict:
    """Generate on the private split, save the release, score it on the validation split."""
    method = get_method(method_name)
    spec = dataset_spec(dataset)
    classes = list(range(spec.num_classes))
    config, evaluation = _evaluation(method_name, overrides, spc)
    train = _split(dataset, "private", data_dir)
    validation = _split(dataset, "validation", data_dir)
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
        data_dir=data_dir,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    release = method.run(stage, config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if release.images is None:  # a model release has no set to train on: test the model itself
        raise ValueError(f"{method_name} releases a model, not a synthetic set; the benchmark compares synthesizers")
    release_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": release.images, "labels": release.labels}, release_path)
    result = evaluate_training_set(ImageSet(release.images, release.labels), validation, spec, evaluation, seed=seed)
    return {
        "method": method_name,
        "dataset": dataset,
        "eps": epsilon,
        "overrides": overrides,
        "generation_seconds": round(wall, 1),
        "generation_cpu_seconds": round(cpu, 1),
        "validation_accuracy": round(100 * result.mean, 2),
        "validation_std": round(100 * result.std, 2),
        "test_accuracy": "",  # the chosen row's only (choose_and_test)
        "test_std": "",
        "real2gen": "",  # the chosen row's only: classifiers trained on real validation images, tested on the set
        "real2gen_std": "",
        "images": len(release.labels),
        "release": release_path.name,
        "load_average": round(os.getloadavg()[0], 2),
    }


def choose_and_test(rows: list[dict], spc: int, data_dir: str | None, seed: int, releases: Path) -> dict:
    """The rows of one (method, dataset, eps) group: mark the best on validation, test it alone."""
    chosen = max(rows, key=lambda row: row["validation_accuracy"])
    spec = dataset_spec(chosen["dataset"])
    _, evaluation = _evaluation(chosen["method"], chosen["overrides"], spc)
    saved = torch.load(releases / chosen["release"])
    test = _split(chosen["dataset"], "test", data_dir)
    synthetic = ImageSet(saved["images"], saved["labels"])
    result = evaluate_training_set(synthetic, test, spec, evaluation, seed=seed)
    chosen["test_accuracy"] = round(100 * result.mean, 2)
    chosen["test_std"] = round(100 * result.std, 2)
    # Reversed utility of the chosen release: classifiers trained on the evaluator's real validation images.
    real = _split(chosen["dataset"], "validation", data_dir)
    real2gen = reversed_utility(synthetic, real_classifiers(real, spec, REAL_CLASSIFIERS["cpu"], seed=seed))
    chosen["real2gen"] = round(100 * real2gen.mean, 2)
    chosen["real2gen_std"] = round(100 * real2gen.std, 2)
    return chosen


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
        curves[key].append((r["generation_seconds"], r["validation_accuracy"]))
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
        for r in rows:
            if (r["dataset"], r["eps"]) == panel and r["test_accuracy"] != "":
                ax.plot(r["generation_seconds"], r["test_accuracy"], "*", markersize=11, color=colours[r["method"]])
        for name, value in PUBLISHED.get((dataset, eps), {}).items():
            ax.axhline(value, linestyle="--", linewidth=1, color="grey")
            ax.text(0.01, value, name, fontsize=7, color="grey", va="bottom", transform=ax.get_yaxis_transform())
        ax.set_title(f"{dataset}, eps={eps:g}, all 10 classes, 10/class")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("generation wall time on this machine (s, log scale)")
        ax.set_ylabel("validation accuracy (%); star: chosen, on test")
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
    rows = read_rows(table)
    releases = args.out / "releases"

    def save() -> None:
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, args.out / "utility.png")

    for dataset in args.datasets:
        for epsilon in args.eps:
            for method in methods:
                grown = False
                for overrides in grid.get(method, [""]):
                    if any(_key(r) == (method, dataset, epsilon, overrides) for r in rows):
                        continue  # resume: finished points are kept
                    grown = True
                    release_path = releases / f"{len(rows):04d}-{method}-{dataset}-eps{epsilon:g}.pt"
                    row = run_point(
                        method, overrides, dataset, epsilon, args.spc, args.data_dir, args.seed, release_path
                    )
                    rows.append(row)
                    print(
                        f"{method:7s} {dataset:6s} eps={epsilon:<4g} [{overrides}] validation "
                        f"{row['validation_accuracy']:.1f}% in {row['generation_seconds']:.0f} s "
                        f"(load {row['load_average']})",
                        flush=True,
                    )
                    save()
                group = [r for r in rows if _key(r)[:3] == (method, dataset, epsilon)]
                if not grown and any(r["test_accuracy"] != "" for r in group):
                    continue  # chosen and tested by an earlier call
                for row in group:  # a grown group chooses again
                    row["test_accuracy"] = row["test_std"] = row["real2gen"] = row["real2gen_std"] = ""
                chosen = choose_and_test(group, args.spc, args.data_dir, args.seed, releases)
                print(
                    f"{method:7s} {dataset:6s} eps={epsilon:<4g} chosen on validation: [{chosen['overrides']}] "
                    f"validation {chosen['validation_accuracy']:.1f}%, test {chosen['test_accuracy']:.1f}%, "
                    f"real2gen {chosen['real2gen']:.1f}%",
                    flush=True,
                )
                save()
    print(f"wrote {table} and {args.out / 'utility.png'}")
    return 0


def _key(row: dict) -> tuple:
    return row["method"], row["dataset"], row["eps"], row["overrides"]


def read_rows(table: Path) -> list[dict]:
    """Finished points of an earlier call (resume)."""
    if not table.exists():
        return []
    rows = list(csv.DictReader(table.open()))
    if rows and "validation_accuracy" not in rows[0]:
        raise SystemExit(f"{table} was written before selection moved to the validation split; use a new --out")
    for row in rows:
        for key in ("eps", "generation_seconds", "generation_cpu_seconds", "validation_accuracy", "validation_std"):
            row[key] = float(row[key])
        for key in ("test_accuracy", "test_std", "real2gen", "real2gen_std"):
            row[key] = float(row[key]) if row.get(key, "") != "" else ""
    return rows


if __name__ == "__main__":
    sys.exit(main())
