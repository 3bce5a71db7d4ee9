"""Repetitions of a run: their folders and seeds, their statistics, and the orderings they support."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedpsg.continual.coordinator import Coordinator
from fedpsg.continual.local import LocalParties
from fedpsg.runs.folder import in_run_context, run_log
from fedpsg.runs.repeats import mean_interval, paired_differences, repeat_settings, repeat_statistics, run_repeats
from fedpsg.runs.settings import RunConfig, resolve_settings
from fedpsg.runs.superlink import REPO
from server.app import make_server_app
from tests.inprocess import InProcessGrid, patch_task_identity
from tests.test_plugin_method import FAST  # registers the toy method: the fastest real DP release

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_interval_is_the_students_t_interval_of_the_mean():
    interval = mean_interval([0.70, 0.74, 0.78])
    assert interval.n == 3 and interval.mean == pytest.approx(0.74)
    assert interval.std == pytest.approx(0.04)  # sample standard deviation (n - 1)
    half = T_975_DF2 * 0.04 / math.sqrt(3)
    assert (interval.low, interval.high) == pytest.approx((0.74 - half, 0.74 + half))
    assert interval.excludes_zero and not mean_interval([0.02, -0.01, 0.01]).excludes_zero
    single = mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.std) and math.isnan(single.low)


def results(accuracies: dict[str, list[float]], stage: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": method, "stage": stage, "repeat": repeat, "accuracy": accuracy}
            for method, values in accuracies.items()
            for repeat, accuracy in enumerate(values, start=1)
        ]
    )


def test_an_ordering_is_stated_only_where_the_paired_interval_excludes_zero():
    # Repetitions differ a lot (their split, seed and test draws are shared by both methods), and
    # "a" is 2 points above "b" in every one: the paired difference resolves what the two
    # methods' own intervals, which overlap, cannot.
    shared = [0.60, 0.80, 0.70, 0.90]
    frame = results({"a": [s + 0.02 + e for s, e in zip(shared, [0.001, -0.001, 0.002, 0.0])], "b": shared})
    stats = repeat_statistics(frame, "stage").set_index("method")
    assert stats.loc["a", "ci_low"] < stats.loc["b", "ci_high"]  # unpaired: overlapping intervals
    (difference,) = paired_differences(frame, "stage")
    assert difference["ordering"] == "a > b" and difference["difference"] == pytest.approx(0.0205)
    assert difference["repeats"] == 4 and difference["ci_low"] > 0

    noisy = results({"a": [0.71, 0.69, 0.72, 0.685], "b": [0.70, 0.70, 0.70, 0.70]})
    (difference,) = paired_differences(noisy, "stage")
    assert difference["ordering"] == "not resolved" and difference["ci_low"] < 0 < difference["ci_high"]

    swapped = results({"a": shared, "b": [s + 0.03 for s in shared]})
    assert paired_differences(swapped, "stage")[0]["ordering"] == "b > a"


def test_repetitions_have_their_folders_and_seeds_write_joint_outputs_and_resume(tmp_path, data_dir, single_thread):
    settings = resolve_settings(
        "split_mnist", profile="tiny", stages=2, methods=["toy"], out=tmp_path / "run", data_dir=str(data_dir),
        overrides=FAST,
    )  # fmt: skip
    repetitions = repeat_settings(settings, 3)
    assert [r.out.name for r in repetitions] == ["repeat-1", "repeat-2", "repeat-3"]
    assert len({r.seed for r in repetitions}) == 3 and repetitions[0].seed == settings.seed
    replies = []

    def run_one(repetition) -> bool:
        # Each repetition simulates its parties afresh (as fedpsg.simulate does): one party's
        # lifetime ledger would refuse a second run at the same budget.
        parties = LocalParties(str(data_dir), state_dir=repetition.out / "parties")
        Coordinator(repetition).run(parties)
        replies.extend(parties.replies)
        return True

    assert run_repeats(settings, 3, run_one)
    assert len(replies) == 3 * 2  # 3 repetitions x 2 stages, each a fresh release
    first, second = replies[0].images, replies[2].images
    assert not first.equal(second)  # fresh party secrets (and seeds) per repetition

    out = settings.out
    frame = pd.read_csv(out / "results.csv")
    assert sorted(frame["repeat"].unique()) == [1, 2, 3]
    seeds = {json.loads((r.out / "config.json").read_text())["seed"] for r in repetitions}
    assert set(frame["seed"]) == seeds == {r.seed for r in repetitions}
    stats = pd.read_csv(out / "statistics.csv")
    assert stats["repeats"].tolist() == [3, 3] and stats["stage"].tolist() == [1, 2]
    stage2 = frame[frame["stage"] == 2]["accuracy"]
    assert stats.loc[1, "accuracy"] == pytest.approx(stage2.mean())
    assert stats.loc[1, "ci_low"] < stage2.min() and stats.loc[1, "ci_high"] > stage2.max()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["repeats"] == 3 and "seed" not in summary["settings"]
    assert "95% confidence interval" in (out / "report.md").read_text()
    assert (out / "accuracy.png").exists() and (out / "DONE").exists()

    assert run_repeats(settings, 3, run_one)  # resumed: every stage is on disk, nothing is redone
    assert len(replies) == 6
    with pytest.raises(ValueError, match="resume it with --repeats 3"):
        repeat_settings(settings, 1)
    with pytest.raises(ValueError, match="holds a single run"):
        repeat_settings(repetitions[0], 2)


def test_the_server_app_runs_the_run_configs_repeats_and_each_is_charged_to_the_parties(
    tmp_path, data_dir, party_state, monkeypatch
):
    patch_task_identity(monkeypatch)
    grid = InProcessGrid(data_dir, num_partitions=5, torch_threads=1, state_dir=party_state)
    out = tmp_path / "flwr"
    run_config = {
        "scenario": "split_mnist", "profile": "tiny", "stages": 1, "methods": "toy", "out": str(out),
        "data-dir": str(data_dir), "set": " ".join(FAST), "repeats": 2,
    }  # fmt: skip
    server_app = make_server_app()
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    frame = pd.read_csv(out / "results.csv")
    assert frame["repeat"].tolist() == [1, 2] and (out / "DONE").exists()
    assert all((out / f"repeat-{r}" / "DONE").exists() for r in (1, 2))
    ledger = json.loads(next((party_state / "party-0").glob("ledger-*.json")).read_text())
    assert len(ledger["entries"]) == 2  # the party recorded both repetitions' releases

    for bad, reason in [("0", "repeats must be >= 1"), ("two", "invalid literal")]:
        with pytest.raises(ValueError, match=reason):
            RunConfig({"repeats": bad}).positive_int("repeats", 1)
    assert RunConfig({"repeats": ""}).positive_int("repeats", 1) == 1
    assert RunConfig({}).positive_int("parallel-jobs", 5) == 5


@pytest.mark.slow
def test_simulated_repetitions_run_side_by_side_each_with_its_own_parties(tmp_path, data_dir):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedpsg.simulate", "--scenario", "split_fmnist", "--profile", "tiny"]
    command += ["--stages", "2", "--methods", "psg,dpmerf", "--repeats", "2", "--out", str(out)]
    command += ["--data-dir", str(data_dir), "--set", "evaluation.epochs=20"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "DONE").exists() and all((out / f"repeat-{r}" / "DONE").exists() for r in (1, 2))
    for r in (1, 2):  # each repetition's parties keep their own ledgers: one release per method each
        for k in (0, 1):
            ledger = json.loads((out / f"repeat-{r}" / "parties" / f"party-{k}" / "ledger-fmnist.json").read_text())
            assert sorted(e["method"] for e in ledger["entries"]) == ["dpmerf", "psg"]
        log = (out / f"repeat-{r}" / "run.log").read_text().splitlines()
        assert sum("psg stage 1/2: party" in line for line in log) == 1  # its own stage, not the other's
    jobs = pd.concat([pd.read_csv(out / f"repeat-{r}" / "timeline.csv").assign(repeat=r) for r in (1, 2)]).query(
        "kind == 'party'"
    )
    # Stages of both repetitions overlapped, and never more at once than the machine's slots.
    edges = sorted([(t, 1) for t in jobs["start"]] + [(t, -1) for t in jobs["end"]], key=lambda e: (e[0], e[1]))
    in_flight = list(itertools.accumulate(step for _, step in edges))
    slots = os.cpu_count() or 1
    assert max(in_flight) <= slots
    first = jobs[jobs["repeat"] == 1]
    second = jobs[jobs["repeat"] == 2]
    assert second["start"].min() < first["end"].max() and first["start"].min() < second["end"].max()


def test_runs_side_by_side_each_keep_their_own_run_log(tmp_path):
    log = logging.getLogger("fedpsg.tests.run_log")
    level_before = logging.getLogger("fedpsg").level
    both_open, both_written = threading.Barrier(2), threading.Barrier(2)

    def run(name: str) -> None:
        with run_log(tmp_path / name / "run.log"):
            both_open.wait()
            log.info("%s: coordinator", name)
            with ThreadPoolExecutor(1) as pool:  # a job of this run in a worker thread
                pool.submit(in_run_context(log.info), "%s: job", name).result()
                pool.submit(log.info, "%s: outside any run", name).result()
            both_written.wait()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, ["a", "b"]))
    lines = {name: [line.split(": ", 1)[1] for line in (tmp_path / name / "run.log").read_text().splitlines()]
             for name in "ab"}  # fmt: skip
    for own, other in (("a", "b"), ("b", "a")):
        assert f"{own}: coordinator" in lines[own] and f"{own}: job" in lines[own]
        assert f"{other}: coordinator" not in lines[own] and f"{other}: job" not in lines[own]
        assert {"a: outside any run", "b: outside any run"} <= set(lines[own])  # shared lines reach both
    assert logging.getLogger("fedpsg").level == level_before
