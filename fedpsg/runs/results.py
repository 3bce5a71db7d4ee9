"""Run outputs: per-stage CSV, JSON summary, Figure-3-style plot, Markdown/terminal tables."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fedpsg.io.files import write_csv, write_json, write_text_atomically  # noqa: E402
from fedpsg.methods import get_method  # noqa: E402


def write_results(rows: list[dict], out: Path, title: str) -> pd.DataFrame:
    """results.csv, accuracy.png and report.md from the per-stage rows (one per method x stage)."""
    frame = pd.DataFrame(rows).sort_values(["method", "stage"]).reset_index(drop=True)
    stage_columns = sorted((c for c in frame.columns if c.startswith("acc_stage")), key=lambda c: int(c[9:]))
    leading = ["method", "stage", "classes", "accuracy", "accuracy_std", *stage_columns]
    frame = frame[leading + [c for c in frame.columns if c not in leading]]
    write_csv(out / "results.csv", frame)
    plot_accuracy(frame, out / "accuracy.png", title)
    write_text_atomically(out / "report.md", markdown_report(frame, title))
    return frame


def plot_accuracy(frame: pd.DataFrame, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method, group in frame.groupby("method", sort=False):
        ax.errorbar(
            group["stage"], 100 * group["accuracy"], yerr=100 * group["accuracy_std"],
            marker="o", capsize=3, label=get_method(method).label,
        )  # fmt: skip
    stages = sorted(frame["stage"].unique())
    ax.set_xticks(stages)
    ax.set_xlabel("training stage")
    ax.set_ylabel("average accuracy over seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Methods as rows, stages as columns, average accuracy (%) over seen classes."""
    table = frame.pivot(index="method", columns="stage", values="accuracy").mul(100).round(1)
    table.columns = [f"stage {c}" for c in table.columns]
    spent = frame.groupby("method")["epsilon"].max().map(lambda e: "inf" if math.isinf(e) else f"{e:.3g}")
    table["eps per party"] = spent
    table["party time (s)"] = frame.groupby("method")["party_seconds"].sum().round(0).astype(int)
    return table


def markdown_report(frame: pd.DataFrame, title: str) -> str:
    table = accuracy_table(frame)
    header = "| method | " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * (len(table.columns) + 1)
    lines = [f"# {title}", "", "Average accuracy (%) over the classes seen so far.", "", header, rule]
    lines += [f"| {m} | " + " | ".join(str(v) for v in row) + " |" for m, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def write_summary(frame: pd.DataFrame, out: Path, settings: dict, extra: dict) -> dict:
    final = frame.sort_values("stage").groupby("method").last()
    summary = {
        "settings": settings,
        "final_accuracy": {m: float(r["accuracy"]) for m, r in final.iterrows()},
        "stages": frame.to_dict(orient="records"),
        **extra,
    }
    write_json(out / "summary.json", summary)
    return summary
