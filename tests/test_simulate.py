"""The platform's main job end to end: a Flower simulation on Ray with real FashionMNIST."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from fedpsg.simulate import main

FAST = ["--profile", "tiny", "--eps", "10", "--set", "evaluation.num_evals=1", "psg.evaluation.epochs=200"]


def simulate(out, data_dir, *extra):
    command = [sys.executable, "-m", "fedpsg.simulate", "--scenario", "split_fmnist", *FAST, "--out", str(out)]
    result = subprocess.run(
        [*command, "--data-dir", str(data_dir), *extra], capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_five_stage_run_resumes_after_interruption_and_writes_consistent_results(tmp_path, data_dir):
    out = tmp_path / "run"
    # An "interrupted" run: only the first two PSG stages finished.
    simulate(out, data_dir, "--stages", "2", "--methods", "psg")
    first_sets = {p.name: p.stat().st_mtime_ns for p in (out / "sets" / "psg").glob("stage*.pt")}
    assert sorted(first_sets) == ["stage1.pt", "stage2.pt"]

    # Resume: PSG stages 1-2 are loaded, 3-5 run; then both baselines run all five stages.
    simulate(out, data_dir, "--methods", "psg,dpsgd,dpmerf")
    log = (out / "run.log").read_text()
    assert "psg stage 1/5 already done: skipped" in log and "psg stage 2/5 already done: skipped" in log
    for name, mtime in first_sets.items():  # finished stages were not redone
        assert (out / "sets" / "psg" / name).stat().st_mtime_ns == mtime

    for name in ["results.csv", "summary.json", "accuracy.png", "report.md", "config.json", "DONE"]:
        assert (out / name).exists(), name
    for stage in range(1, 6):
        assert (out / "grids" / f"psg-stage{stage}.png").stat().st_size > 0
        assert (out / "grids" / f"dpmerf-stage{stage}.png").stat().st_size > 0
    assert not list((out / "grids").glob("dpsgd*"))  # DP-SGD parties release only a model
    everything = pd.read_csv(out / "results.csv")
    assert sorted(everything["method"].unique()) == ["dpmerf", "dpsgd", "psg"]  # three curves
    for method, rows in everything.groupby("method"):
        assert rows["stage"].tolist() == [1, 2, 3, 4, 5], method
        assert (rows["epsilon"] <= 10.0).all() and (rows["epsilon"] > 10.0 * (1 - 1e-3)).all(), method
    final = everything.groupby("method")["accuracy"].last()
    # The forgetting effect the platform exists to show: finetuning without replay ends below PSG.
    assert final["dpsgd"] < final["psg"]
    assert "| dpsgd |" in (out / "report.md").read_text()
    frame = everything[everything["method"] == "psg"].reset_index(drop=True)
    assert frame["stage"].tolist() == [1, 2, 3, 4, 5]
    assert frame["classes"].tolist() == ["5 6", "1 2", "0 8", "9 3", "4 7"]
    # stage k reports accuracy on stages 1..k's classes and nothing beyond
    for _, row in frame.iterrows():
        for k in range(1, 6):
            assert pd.isna(row[f"acc_stage{k}"]) == (k > row["stage"])
    assert frame.loc[0, "accuracy"] > 0.75  # two classes: chance is 0.5
    assert (frame["epsilon"] <= 10.0).all() and (frame["epsilon"] > 10.0 * (1 - 1e-3)).all()
    assert (frame["delta"] == 1e-5).all() and (frame["accountant"] == "rdp").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"]["psg"] == pytest.approx(frame["accuracy"].iloc[-1])


def test_resume_with_different_settings_is_refused(tmp_path, data_dir, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"epsilon": 1.0}))
    with pytest.raises(SystemExit):
        main(["--profile", "tiny", "--out", str(tmp_path)])
    assert "different settings" in capsys.readouterr().err
    from fedpsg.continual.coordinator import Coordinator
    from fedpsg.data.datasets import load_images
    from fedpsg.runs.folder import ResumeMismatchError
    from fedpsg.runs.settings import resolve_settings

    settings = resolve_settings("split_fmnist", profile="tiny", out=tmp_path)
    with pytest.raises(ResumeMismatchError, match="different settings"):
        Coordinator(settings, load_images("fmnist", False, data_dir))


BAD = [
    (["--scenario", "split_cifar"], "split_fmnist"),  # lists the available ones
    (["--eps", "0"], "--eps"),
    (["--eps", "-1"], "--eps"),
    (["--delta", "0"], "--delta"),
    (["--stages", "6"], "stages must be in 1..5"),
    (["--methods", "psg,gan"], "unknown method 'gan'"),
    (["--set", "psg.iterations=abc"], "psg.iterations='abc': expected int"),
    (["--set", "psg.iterations=0"], "psg: must be >= 1: iterations"),
    (["--set", "psg.no_such_setting=1"], "unknown setting psg.no_such_setting"),
    (["--set", "gan.width=3"], "unknown settings section 'gan'"),
    (["--set", "iterations"], "SECTION.KEY=VALUE"),
    (["--profile", "gpu-xl"], "--profile"),
    (["--replay", "sometimes"], "--replay"),
    (["--device", "tpu"], "device"),
    (["--repeats", "0"], "--repeats"),
]


@pytest.mark.parametrize("argv,reason", BAD)
def test_bad_flags_rejected_before_anything_starts(argv, reason, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
