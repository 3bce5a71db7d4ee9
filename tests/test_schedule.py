"""The continual run's job graph: what may start when, and stages side by side for real."""

import json
import threading

import pandas as pd
import pytest

from fedpsg.continual.coordinator import TIMELINE_FILE, Coordinator
from fedpsg.continual.local import LocalParties
from fedpsg.continual.schedule import StageGraph
from fedpsg.continual.timeline import projected_wall_time
from fedpsg.runs.settings import resolve_settings
from fedpsg.simulation import prepare_parties


def test_a_chain_waits_for_its_previous_stage_and_independent_stages_fill_the_free_parties():
    graph = StageGraph(["dpmerf", "psg"], num_stages=3, capacity=2)
    # PSG's stage 1 first (it heads a chain); party 0 is then busy, so DP-Merf's stage 2 goes.
    assert graph.party_ready() == [("psg", 1), ("dpmerf", 2)]
    graph.running |= {("psg", 1), ("dpmerf", 2)}
    assert graph.party_ready() == []  # capacity reached
    graph.running.discard(("dpmerf", 2))
    graph.received.add(("dpmerf", 2))
    assert graph.party_ready() == [("dpmerf", 3)]  # PSG's stage 2 waits for its stage 1; party 0 is busy
    graph.running.clear()
    graph.received.add(("psg", 1))
    assert graph.party_ready() == [("psg", 2), ("dpmerf", 1)]


def test_dpsgd_finetunes_the_previous_model_so_its_stages_form_a_chain():
    graph = StageGraph(["dpsgd"], num_stages=3, capacity=3)
    assert graph.party_ready() == [("dpsgd", 1)]
    graph.received.add(("dpsgd", 1))
    assert graph.party_ready() == [("dpsgd", 2)]


def test_an_evaluation_waits_for_every_set_it_replays():
    graph = StageGraph(["dpmerf"], num_stages=3, capacity=3)
    graph.received |= {("dpmerf", 1), ("dpmerf", 3)}
    assert graph.evaluation_ready() == [("dpmerf", 1)]  # stage 3 replays stage 2's set, not here yet
    graph.received.add(("dpmerf", 2))
    assert graph.evaluation_ready() == [("dpmerf", 1), ("dpmerf", 2), ("dpmerf", 3)]
    continued = StageGraph(["dpmerf"], num_stages=2, continue_replay=True, received={("dpmerf", 1), ("dpmerf", 2)})
    assert continued.evaluation_ready() == [("dpmerf", 1)]  # stage 2 trains on from stage 1's classifier
    with pytest.raises(ValueError, match="capacity"):
        StageGraph(["psg"], num_stages=1, capacity=0)


def most_jobs_at_once(timeline: pd.DataFrame) -> int:
    events = sorted([(t, 1) for t in timeline["start"]] + [(t, -1) for t in timeline["end"]])  # ends first
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("evaluations_share_slots", [False, True])
def test_independent_stages_run_side_by_side_and_the_timeline_shows_it(tmp_path, data_dir, evaluations_share_slots):
    settings = resolve_settings(
        "split_fmnist", profile="tiny", stages=2, methods=["dpmerf", "dpdm"], out=tmp_path / "run",
        data_dir=str(data_dir), overrides="evaluation.epochs=5 dpmerf.generator_steps=100 dpdm.iterations=30",
    )  # fmt: skip
    parties = LocalParties(str(data_dir), state_dir=prepare_parties(settings), capacity=2)
    parties.evaluations_share_slots = evaluations_share_slots  # as in a simulation: parties on these cores
    rows = Coordinator(settings).run(parties)
    assert sorted((r["method"], r["stage"]) for r in rows) == [(m, k) for m in ("dpdm", "dpmerf") for k in (1, 2)]
    timeline = pd.read_csv(settings.out / TIMELINE_FILE)
    jobs = timeline[timeline["kind"] == "party"].sort_values("start")
    assert len(jobs) == 4 and (timeline["kind"] == "evaluation").sum() == 4
    # Some party job started before the one before it ended: two stages were in flight at once.
    assert (jobs["start"].to_numpy()[1:] < jobs["end"].cummax().to_numpy()[:-1]).any()
    # One job per party at a time: jobs of the same partition never overlap.
    for _, same in jobs.groupby("partition"):
        same = same.sort_values("start")
        assert (same["start"].to_numpy()[1:] >= same["end"].to_numpy()[:-1]).all()
    if evaluations_share_slots:  # never more jobs, evaluations included, than the two slots
        assert most_jobs_at_once(timeline) <= 2
    summary = json.loads((settings.out / "timeline.json").read_text())
    assert summary["critical_path_seconds"] <= summary["projected_wall_seconds"]["2"] <= summary["busy_seconds"]
    assert (settings.out / "timeline.png").exists()


def test_the_projection_replays_the_graph_on_the_given_cores():
    # PSG: a chain of two 10 s stages; DP-Merf: two independent 4 s stages; evaluations 1 s.
    rows = [("party", "psg", 1, 10), ("party", "psg", 2, 10), ("party", "dpmerf", 1, 4), ("party", "dpmerf", 2, 4)]
    rows += [("evaluation", m, k, 1) for m in ("psg", "dpmerf") for k in (1, 2)]
    frame = pd.DataFrame(rows, columns=["kind", "method", "stage", "seconds"])
    # Unlimited cores: psg 1 -> psg 2 -> its evaluation.
    assert projected_wall_time(frame, ["psg", "dpmerf"], 2, None) == 21
    # One core: every job one after another.
    assert projected_wall_time(frame, ["psg", "dpmerf"], 2, 1) == 32
    # Two cores: psg 1 | dpmerf 2 then dpmerf 1 (party 0 was busy), evaluations in the gaps.
    assert projected_wall_time(frame, ["psg", "dpmerf"], 2, 2) == 21


def test_evaluations_sharing_the_parties_slots_run_side_by_side(tmp_path, data_dir, monkeypatch):
    # The first two evaluations wait for each other: with one evaluation thread the barrier breaks.
    settings = resolve_settings(
        "split_fmnist", profile="tiny", stages=2, methods=["dpmerf"], out=tmp_path / "run",
        data_dir=str(data_dir), overrides="evaluation.epochs=2 dpmerf.generator_steps=20",
    )  # fmt: skip
    parties = LocalParties(str(data_dir), state_dir=prepare_parties(settings), capacity=2)
    parties.evaluations_share_slots = True
    barrier, calls, lock = threading.Barrier(2, timeout=120), [], threading.Lock()
    evaluate = Coordinator._evaluate_received

    def evaluate_together(self, method, stage):
        with lock:
            calls.append(stage)
            first_two = len(calls) <= 2
        if first_two:
            barrier.wait()
        return evaluate(self, method, stage)

    monkeypatch.setattr(Coordinator, "_evaluate_received", evaluate_together)
    rows = Coordinator(settings).run(parties)
    assert sorted(r["stage"] for r in rows) == [1, 2]
    timeline = pd.read_csv(settings.out / TIMELINE_FILE)
    evaluations = timeline[timeline["kind"] == "evaluation"]
    assert most_jobs_at_once(evaluations) == 2
    assert (settings.out / "accuracy.png").exists() and len(pd.read_csv(settings.out / "results.csv")) == 2
