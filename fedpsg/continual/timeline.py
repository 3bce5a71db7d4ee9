"""What ran when in a continual run (``timeline.csv``): a Gantt chart, the critical path, and the
wall time the same jobs would take on more cores.

The coordinator appends one line per finished job (party stage or evaluation) with its wall-clock
start and end. The projection replays the run's job graph (``fedpsg.continual.schedule``) with
the measured durations on ``cores`` slots, each job taking one slot (one thread), party jobs
and evaluations alike; the critical path is the projection with unlimited slots. Durations
measured on a busy machine project a busy machine.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: its global state is not safe across threads

from fedpsg.continual.schedule import StageGraph

PROJECTED_CORES = (2, 8, 16, 64)


def read_timeline(path: Path) -> pd.DataFrame:
    """The timeline's jobs; a job run twice (resumed, retried) keeps its last record."""
    frame = pd.read_csv(path)
    return frame.drop_duplicates(["kind", "method", "stage"], keep="last").reset_index(drop=True)


def projected_wall_time(frame: pd.DataFrame, methods: list[str], num_stages: int, cores: int | None) -> float:
    """Seconds from the first job's start to the last job's end with ``cores`` slots (None: unlimited)."""
    seconds = {(r.kind, r.method, int(r.stage)): float(r.seconds) for r in frame.itertuples()}
    slots = cores or 10**6
    graph = StageGraph(list(methods), num_stages, capacity=slots)
    now, events = 0.0, []  # (end time, kind, job); party jobs first, evaluations in the slots left
    while not graph.finished():
        graph.capacity = slots - len(graph.evaluating)
        for job in graph.party_ready():
            graph.running.add(job)
            heapq.heappush(events, (now + seconds.get(("party", *job), 0.0), "party", job))
        for job in graph.evaluation_ready()[: slots - len(events)]:
            graph.evaluating.add(job)
            heapq.heappush(events, (now + seconds.get(("evaluation", *job), 0.0), "evaluation", job))
        if not events:
            raise ValueError("the timeline's jobs do not complete the graph")
        now, kind, job = heapq.heappop(events)
        if kind == "party":
            graph.running.discard(job)
            graph.received.add(job)
        else:
            graph.evaluating.discard(job)
            graph.evaluated.add(job)
    return now


def timeline_summary(frame: pd.DataFrame, methods: list[str], num_stages: int) -> dict:
    """Measured wall time and busy seconds, the critical path, and projections at PROJECTED_CORES."""
    return {
        "measured_wall_seconds": round(float(frame["end"].max() - frame["start"].min()), 1),
        "busy_seconds": round(float(frame["seconds"].sum()), 1),
        "critical_path_seconds": round(projected_wall_time(frame, methods, num_stages, None), 1),
        "projected_wall_seconds": {
            str(cores): round(projected_wall_time(frame, methods, num_stages, cores), 1) for cores in PROJECTED_CORES
        },
    }


def plot_timeline(frame: pd.DataFrame, path: Path, title: str) -> None:
    """A Gantt chart: one lane per job slot in use, bars coloured by method, evaluations hatched."""
    start = frame["start"].min()
    lanes: list[float] = []  # end time of the last job in each lane
    methods = sorted(frame["method"].unique())
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(frame) ** 0.5)))
    ax = fig.subplots()
    for row in frame.sort_values("start").itertuples():
        lane = next((i for i, end in enumerate(lanes) if end <= row.start + 1e-6), len(lanes))
        if lane == len(lanes):
            lanes.append(0.0)
        lanes[lane] = row.end
        evaluation = row.kind == "evaluation"
        ax.barh(
            lane,
            (row.end - row.start) / 60,
            left=(row.start - start) / 60,
            color=colours[row.method],
            hatch="//" if evaluation else None,
            edgecolor="black",
            linewidth=0.4,
            alpha=0.6 if evaluation else 1.0,
        )
        ax.text((row.start - start) / 60, lane, f" {row.stage}", va="center", fontsize=6)
    for method in methods:
        ax.barh(0, 0, color=colours[method], label=method)
    ax.barh(0, 0, color="white", hatch="//", edgecolor="black", label="evaluation")
    ax.set_yticks(range(len(lanes)), [f"slot {i + 1}" for i in range(len(lanes))])
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the first job started (bar label: stage)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=len(methods) + 1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
