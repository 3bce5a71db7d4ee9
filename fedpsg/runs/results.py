"""Run outputs of both scenario kinds: per-stage CSV, JSON summary, accuracy plots, Markdown/terminal tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: its global state is not safe across threads

from fedpsg.io.files import write_csv, write_json, write_text_atomically


@dataclass(frozen=True)
class XAxis:
    """What a panel of the accuracy plot has on its x axis: a column of the results."""

    column: str
    label: str
    log: bool = False
    tick_every_value: bool = False  # a tick at each value (stages), not matplotlib's choice


def write_results(rows: list[dict], out: Path, title: str, labels: Mapping[str, str]) -> pd.DataFrame:
    """results.csv, accuracy.png and report.md from the per-stage rows (one per method x stage)."""
    frame = pd.DataFrame(rows).sort_values(["method", "stage"]).reset_index(drop=True)
    stage_columns = sorted((c for c in frame.columns if c.startswith("acc_stage")), key=lambda c: int(c[9:]))
    leading = ["method", "stage", "classes", "accuracy", "accuracy_std", *stage_columns]
    frame = frame[leading + [c for c in frame.columns if c not in leading]]
    write_csv(out / "results.csv", frame)
    stage = XAxis("stage", "training stage", tick_every_value=True)
    plot_accuracy(frame, out / "accuracy.png", title, [stage], "average accuracy over seen classes (%)", labels)
    note = "Average accuracy (%) over the classes seen so far."
    write_text_atomically(out / "report.md", markdown_report(title, accuracy_table(frame).reset_index(), note))
    return frame


def plot_accuracy(
    frame: pd.DataFrame, path: Path, title: str, axes: Sequence[XAxis], ylabel: str, labels: Mapping[str, str]
) -> None:
    """Accuracy (%) against each of ``axes`` (a panel each): a curve per method, named
    ``labels[method]``, with a confidence band where the frame has ``ci_low``/``ci_high``
    (repetitions), else error bars where it has an ``accuracy_std``."""
    fig = Figure(figsize=(0.5 + 4.5 * len(axes), 3.6))
    panels = fig.subplots(1, len(axes), squeeze=False)
    for panel, axis in zip(panels[0], axes):
        for method, group in frame.groupby("method", sort=False):
            label, at = labels.get(method, method), group[axis.column]
            if "ci_low" in group:
                (line,) = panel.plot(at, 100 * group["accuracy"], marker="o", label=label)
                panel.fill_between(at, 100 * group["ci_low"], 100 * group["ci_high"], color=line.get_color(), alpha=0.2)
                continue
            std = 100 * group["accuracy_std"] if "accuracy_std" in group else None
            panel.errorbar(at, 100 * group["accuracy"], yerr=std, marker="o", capsize=3, label=label)
        if axis.tick_every_value:
            panel.set_xticks(sorted(frame[axis.column].unique()))
        if axis.log:
            panel.set_xscale("log")
        panel.set_xlabel(axis.label)
        panel.set_ylabel(ylabel)
        panel.set_ylim(0, 100)
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Methods as rows, stages as columns, average accuracy (%) over seen classes."""
    table = frame.pivot(index="method", columns="stage", values="accuracy").mul(100).round(1)
    table.columns = [f"stage {c}" for c in table.columns]
    spent = frame.groupby("method")["epsilon"].max().map(lambda e: "inf" if math.isinf(e) else f"{e:.3g}")
    real2gen = pd.to_numeric(frame.get("real2gen", pd.Series(dtype=float)), errors="coerce")
    if real2gen.notna().any():  # reversed utility of each method's set at its last stage (none for a model)
        last = real2gen[frame.groupby("method")["stage"].idxmax()]
        table["real2gen, last stage"] = last.set_axis(frame.loc[last.index, "method"]).mul(100).round(1)
    table["eps per party"] = spent
    table["party time (s)"] = frame.groupby("method")["party_seconds"].sum().round(0).astype(int)
    return table


def markdown_report(title: str, table: pd.DataFrame, note: str | None = None) -> str:
    """``# title``, ``note`` and ``table`` (its columns, not its index) as Markdown; floats to 4 digits."""
    lines = [f"# {title}", ""] + ([note, ""] if note else [])
    if table.empty:
        return "\n".join([*lines, "(no evaluations yet)"]) + "\n"
    lines += ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(frame: pd.DataFrame, out: Path, x: str, settings: dict, extra: dict) -> dict:
    """summary.json: the run's settings, each method's accuracy at its last ``x`` (stage or round), ``extra``."""
    final = frame.sort_values(x).groupby("method").last() if len(frame) else pd.DataFrame()
    summary = {"settings": settings, "final_accuracy": {m: float(r["accuracy"]) for m, r in final.iterrows()}, **extra}
    write_json(out / "summary.json", summary)
    return summary
