"""Several continual runs of one scenario, read as one comparison.

A method added later (or one too slow to run beside the others) gets its own run folder; when that
run has the same scenario, budget, profile and public seeds as an earlier one, its repetitions
are paired with the earlier run's: repetition r of both saw the same public seed, split and test
images, so the two methods' paired differences are as valid as within one run. This module
checks exactly that and writes the joint outputs of :func:`fedpsg.runs.repeats.write_joint_outputs`
for every method of every run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedpsg.methods import get_method
from fedpsg.runs.repeats import REPEAT_FOLDER, collect_repeats, write_joint_outputs
from fedpsg.runs.settings import run_title

# What a run's config.json may differ in from another's in a comparison: each run's methods are
# its own, and the seeds are compared repetition by repetition.
PER_RUN_KEYS = ("methods", "seed")


def repetition_folders(run: Path) -> list[Path]:
    """``run``'s repetition folders (``repeat-1``, ``repeat-2``, ...), or ``[run]`` for a single run."""
    folders, r = [], 1
    while (run / REPEAT_FOLDER.format(r)).is_dir():
        folders.append(run / REPEAT_FOLDER.format(r))
        r += 1
    if not folders and (run / "config.json").exists():
        folders = [run]
    if not folders:
        raise ValueError(f"{run} holds no run (no config.json, no {REPEAT_FOLDER.format(1)}/)")
    return folders


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _differences(first: dict, second: dict) -> list[str]:
    keys = sorted((set(first) | set(second)) - set(PER_RUN_KEYS))
    return [key for key in keys if first.get(key) != second.get(key)]


def compare_runs(runs: Sequence[Path], out: Path) -> dict:
    """Check that ``runs`` are comparable and write their joint outputs to ``out``; returns the summary.

    Raises ``ValueError`` when a run is not a finished-enough continual run, when two runs differ in
    anything but their methods (scenario, budget, profile, replay...), when their repetitions do
    not share public seeds (nothing could be paired), or when a method appears in two runs.
    """
    if len(runs) < 2:
        raise ValueError("give at least two runs to compare")
    folders = {run: repetition_folders(run) for run in runs}
    configs = {folder: _config(folder) for repetitions in folders.values() for folder in repetitions}
    reference_run = runs[0]
    reference = configs[folders[reference_run][0]]
    methods: dict[str, Path] = {}
    frames = []
    for run, repetitions in folders.items():
        for folder in repetitions:
            if "epsilon" not in configs[folder]:
                raise ValueError(f"{folder} is not a continual run (a federated-GAN run compares its methods itself)")
            differing = _differences(reference, configs[folder])
            if differing:
                raise ValueError(
                    f"{folder} differs from {reference_run} in {', '.join(differing)}: "
                    "only runs of the same scenario, budget, profile and replay can be compared"
                )
        for method in configs[repetitions[0]]["methods"]:
            if method in methods:
                raise ValueError(f"{method} is in both {methods[method]} and {run}: keep one of them")
            methods[method] = run
        frame = collect_repeats(repetitions)
        if frame.empty:
            raise ValueError(f"{run} has no results yet")
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    seeds = frame.groupby("repeat")["seed"].nunique()
    if (seeds > 1).any():
        mismatched = ", ".join(str(r) for r in seeds[seeds > 1].index)
        raise ValueError(
            f"repetition(s) {mismatched} have different public seeds in different runs: they cannot be paired "
            "(run with the same --seed)"
        )
    settings = {k: v for k, v in reference.items() if k not in PER_RUN_KEYS}
    settings["methods"] = {m: configs[folders[run][0]]["methods"][m] for m, run in methods.items()}
    settings["runs"] = {m: str(run) for m, run in methods.items()}
    title = run_title(reference["scenario"]["name"], float(reference["epsilon"]), float(reference["delta"]))
    labels = {m: get_method(m).label for m in methods}
    return write_joint_outputs(out, frame, list(configs), settings, title, labels, "stage")
