"""Repeats of a run: N independent repetitions in one folder, and what they say together.

With ``--repeats N`` (N > 1) each repetition is a complete run folder ``<out>/repeat-<r>``: its own
public seed (recorded in its config.json), fresh party secrets, its own virtual parties and
ledgers, resumable on its own. ``<out>`` then holds the repetitions' joint outputs:

- ``results.csv``: every repetition's rows, with ``repeat`` and ``seed`` columns;
- ``statistics.csv``: per method and stage (or round) the number of repetitions, the mean, the
  standard deviation and a 95% confidence interval of the mean (Student's t);
- ``summary.json`` and ``report.md``: the same, and the paired difference between every two
  methods at the last stage (paired by repetition: the same seed, split and test images), with its
  interval and the ordering it supports: one only where the interval excludes zero;
- ``accuracy.png``: the means with their confidence bands; ``DONE`` once every repetition is done.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import TypeVar

import pandas as pd
from scipy import stats

from fedpsg.io.files import strict_json, write_csv, write_json, write_text_atomically
from fedpsg.runs.results import XAxis, plot_accuracy

CONFIDENCE = 0.95
# A run derives public seeds as seed + stage and seed + 1000 * stage (rounds alike): repeats' seeds
# lie far enough apart that no two repetitions share one.
REPEAT_SEED_STRIDE = 100_000
REPEAT_FOLDER = "repeat-{}"

# RunSettings or FedGANSettings: a frozen dataclass with out, seed, results_axis, title, method_labels.
Settings = TypeVar("Settings")


def repeat_seed(seed: int, repeat: int) -> int:
    """The public seed of repetition ``repeat`` (1-based) of a run with public seed ``seed``."""
    return seed + REPEAT_SEED_STRIDE * (repeat - 1)


def repeat_settings(settings: Settings, repeats: int) -> list[Settings]:
    """The settings of each repetition: ``[settings]`` for one, else ``<out>/repeat-<r>`` with its own seed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check_repeat_layout(settings.out, repeats)
    if repeats == 1:
        return [settings]
    return [
        replace(settings, out=settings.out / REPEAT_FOLDER.format(r), seed=repeat_seed(settings.seed, r))
        for r in range(1, repeats + 1)
    ]


def check_repeat_layout(out: Path, repeats: int) -> None:
    """Refuse to mix layouts: repetitions into a folder holding one run, or one run into a folder of repetitions."""
    holds_one_run = (out / "config.json").exists()
    holds_repeats = (out / REPEAT_FOLDER.format(1)).is_dir()
    if repeats > 1 and holds_one_run:
        raise ValueError(f"{out} holds a single run; give --repeats {repeats} another --out")
    if repeats == 1 and holds_repeats:
        found = len(list(out.glob(REPEAT_FOLDER.format("*"))))
        raise ValueError(f"{out} holds repetitions (repeat-1..{found}); resume it with --repeats {found}")


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with their standard deviation and a two-sided confidence interval of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student's t interval; one value has no spread (std, low and high are NaN)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


def collect_repeats(folders: Sequence[Path]) -> pd.DataFrame:
    """Every repetition's results.csv rows, with its ``repeat`` (1-based) and public ``seed``."""
    frames = []
    for repeat, folder in enumerate(folders, start=1):
        if not (folder / "results.csv").exists():
            continue
        frame = pd.read_csv(folder / "results.csv")
        seed = json.loads((folder / "config.json").read_text())["seed"]
        frames.append(frame.assign(repeat=repeat, seed=seed)[["repeat", "seed", *frame.columns]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def repeat_statistics(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per method and ``x``: n, mean accuracy, its std and CI (columns accuracy, accuracy_std, ci_low, ci_high)."""
    rows = []
    for (method, at), group in frame.groupby(["method", x], sort=True):
        interval = mean_interval(group["accuracy"])
        rows.append(
            {
                "method": method,
                x: at,
                "repeats": interval.n,
                "accuracy": interval.mean,
                "accuracy_std": interval.std,
                "ci_low": interval.low,
                "ci_high": interval.high,
            }
        )
    return pd.DataFrame(rows)


def paired_differences(frame: pd.DataFrame, x: str) -> list[dict]:
    """Every two methods' accuracy difference at the last ``x`` both reached, paired by repetition."""
    differences = []
    methods = sorted(frame["method"].unique())
    for first, second in combinations(methods, 2):
        pair = frame[frame["method"].isin([first, second])]
        shared = pair.groupby(x)["method"].nunique()
        if not (shared == 2).any():
            continue
        at = shared[shared == 2].index.max()
        wide = pair[pair[x] == at].pivot_table(index="repeat", columns="method", values="accuracy").dropna()
        if wide.empty:
            continue
        interval = mean_interval(wide[first] - wide[second])
        if interval.excludes_zero:
            ordering = f"{first} > {second}" if interval.mean > 0 else f"{second} > {first}"
        else:
            ordering = "not resolved"
        differences.append(
            {
                "first": first,
                "second": second,
                x: int(at),
                "repeats": interval.n,
                "difference": interval.mean,
                "ci_low": interval.low,
                "ci_high": interval.high,
                "ordering": ordering,
            }
        )
    return differences


def _points(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def repeats_report(title: str, statistics: pd.DataFrame, differences: list[dict], x: str) -> str:
    """Markdown: mean ± std [95% CI] per method and x, then the paired differences and their orderings."""
    lines = [
        f"# {title}",
        "",
        f"Accuracy (%): mean ± standard deviation [{CONFIDENCE:.0%} confidence interval] over repetitions.",
        "",
    ]
    columns = sorted(statistics[x].unique())
    lines += [f"| method | {' | '.join(f'{x} {c}' for c in columns)} |", "|---|" + "---|" * len(columns)]
    for method, group in statistics.groupby("method"):
        cells = []
        for at in columns:
            row = group[group[x] == at]
            if row.empty:
                cells.append("")
                continue
            r = row.iloc[0]
            interval = f"[{_points(r.ci_low)}, {_points(r.ci_high)}]"
            cells.append(f"{_points(r.accuracy)} ± {_points(r.accuracy_std)} {interval} (n={r.repeats})")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    if differences:
        lines += [
            "",
            f"Paired differences (points) at the last {x} both methods reached; an ordering is stated only "
            "where the interval excludes zero.",
            "",
            f"| first − second | {x} | n | difference | {CONFIDENCE:.0%} CI | ordering |",
            "|---|---|---|---|---|---|",
        ]
        for d in differences:
            lines.append(
                f"| {d['first']} − {d['second']} | {d[x]} | {d['repeats']} | {_points(d['difference'])} | "
                f"[{_points(d['ci_low'])}, {_points(d['ci_high'])}] | {d['ordering']} |"
            )
    return "\n".join(lines) + "\n"


def write_repeat_outputs(out: Path, repetitions: Sequence[Settings]) -> dict | None:
    """The repetitions' joint outputs in ``out`` (see the module's docstring); None before any results."""
    first = repetitions[0]
    folders = [r.out for r in repetitions]
    frame = collect_repeats(folders)
    if frame.empty:
        return None
    identity = json.loads((folders[0] / "config.json").read_text())
    settings = {k: v for k, v in identity.items() if k != "seed"}
    return write_joint_outputs(out, frame, folders, settings, first.title, first.method_labels, first.results_axis)


def write_joint_outputs(
    out: Path,
    frame: pd.DataFrame,
    folders: Sequence[Path],
    settings: dict,
    title: str,
    labels: dict[str, str],
    x: str,
) -> dict:
    """results.csv, statistics.csv, accuracy.png, report.md and summary.json of repetitions'
    ``frame`` (:func:`collect_repeats`) in ``out``; ``DONE`` once every folder in ``folders`` is done."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", frame)
    statistics = repeat_statistics(frame, x)
    write_csv(out / "statistics.csv", statistics)
    differences = paired_differences(frame, x)
    axis = XAxis(x, x, tick_every_value=True)
    ylabel = f"accuracy (%), mean and {CONFIDENCE:.0%} CI"
    plot_accuracy(statistics, out / "accuracy.png", title, [axis], ylabel, labels)
    write_text_atomically(out / "report.md", repeats_report(title, statistics, differences, x))
    summary = {
        "settings": settings,
        "repeats": int(frame["repeat"].nunique()),
        "seeds": frame.groupby("repeat")["seed"].first().to_dict(),
        "statistics": statistics.to_dict(orient="records"),
        "differences": differences,
    }
    write_json(out / "summary.json", strict_json(summary))
    done = out / "DONE"
    if all((folder / "DONE").exists() for folder in folders):
        done.write_text("completed\n")
    else:
        done.unlink(missing_ok=True)
    return summary


def side_by_side(repetitions: Sequence[Settings]) -> list[Settings]:
    """Repetitions to run at once on one set of nodes: repetition r's party k becomes partition
    ``r * parties + k`` (``RunSettings.first_partition``), a node of its own."""
    return [replace(rep, first_partition=r * rep.num_partitions) for r, rep in enumerate(repetitions)]


def run_repeats(settings: Settings, repeats: int, run_one: Callable[[Settings], bool]) -> bool:
    """Run the repetitions of ``settings`` one after another (``run_one`` returns whether one
    completed), writing the joint outputs after each; stop at the first that does not complete."""
    repetitions = repeat_settings(settings, repeats)
    for repetition in repetitions:
        completed = run_one(repetition)
        if len(repetitions) > 1:
            write_repeat_outputs(settings.out, repetitions)
        if not completed:
            return False
    return True


def run_repeats_together(settings: Settings, repeats: int, run_all: Callable[[list[Settings]], list[bool]]) -> bool:
    """Run all repetitions of ``settings`` at once (``run_all`` returns which completed), then write
    the joint outputs; True if every one completed."""
    repetitions = repeat_settings(settings, repeats)
    completed = run_all(repetitions)
    if len(repetitions) > 1:
        write_repeat_outputs(settings.out, repetitions)
    return all(completed)
