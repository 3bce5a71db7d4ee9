"""Several runs of one scenario read as one comparison (fedpsg.compare)."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest

from fedpsg.compare import main
from fedpsg.io.files import write_json
from fedpsg.runs.repeats import REPEAT_FOLDER, repeat_seed
from fedpsg.runs.settings import resolve_settings

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def make_run(root, methods: dict[str, list[float]], repeats: int = 3, seed: int = 0, **settings):
    """A finished run folder as fedpsg.simulate leaves it: per repetition config.json (the run's
    real identity), results.csv with stage 1 and 2 (``methods[m][r]`` is repetition r's stage 2)
    and DONE."""
    base = resolve_settings("split_mnist", profile="tiny", methods=list(methods), seed=seed, out=root, **settings)
    for r in range(1, repeats + 1):
        folder = root / REPEAT_FOLDER.format(r) if repeats > 1 else root
        folder.mkdir(parents=True)
        identity = {**base.identity(), "seed": repeat_seed(seed, r)}
        write_json(folder / "config.json", identity)
        rows = [
            {"method": m, "stage": stage, "accuracy": 0.9 if stage == 1 else values[r - 1], "epsilon": base.epsilon}
            for m, values in methods.items()
            for stage in (1, 2)
        ]
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
        (folder / "DONE").write_text("completed\n")
    return root


def test_runs_with_the_same_seeds_are_paired_by_repetition(tmp_path, capsys):
    first = make_run(tmp_path / "a", {"dpdm": [0.80, 0.70, 0.90]})
    second = make_run(tmp_path / "b", {"psg": [0.77, 0.66, 0.88], "dpsgd": [0.30, 0.20, 0.25]})
    out = tmp_path / "all"
    assert main([str(first), str(second), "--out", str(out)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["settings"]["methods"]) == {"dpdm", "psg", "dpsgd"}
    assert summary["settings"]["runs"]["dpdm"] == str(first) and summary["repeats"] == 3
    (difference,) = [d for d in summary["differences"] if {d["first"], d["second"]} == {"dpdm", "psg"}]
    # dpdm - psg per repetition: 0.03, 0.04, 0.02 (the runs' spread cancels in the pairs).
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert difference["stage"] == 2 and difference["difference"] == pytest.approx(0.03)
    assert (difference["ci_low"], difference["ci_high"]) == pytest.approx((0.03 - half, 0.03 + half))
    assert difference["ordering"] == "dpdm > psg"
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 3 * 3 * 2 and sorted(frame["seed"].unique()) == [0, 100_000, 200_000]
    assert (out / "accuracy.png").exists() and (out / "DONE").exists()
    assert "dpdm > psg" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("second_run", "message"),
    [
        ({"epsilon": 1.0}, "differs from .* in epsilon"),
        ({"seed": 7}, "different public seeds"),
        ({"methods_": {"dpdm": [0.5, 0.5, 0.5]}}, "dpdm is in both"),
    ],
)
def test_runs_that_cannot_be_paired_are_refused(tmp_path, capsys, second_run, message):
    first = make_run(tmp_path / "a", {"dpdm": [0.80, 0.70, 0.90]})
    methods = second_run.pop("methods_", {"psg": [0.77, 0.66, 0.88]})
    second = make_run(tmp_path / "b", methods, **second_run)
    out = tmp_path / "all"
    assert main([str(first), str(second), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing half-written


def test_a_folder_without_a_run_is_refused_early(tmp_path, capsys):
    first = make_run(tmp_path / "a", {"dpdm": [0.80, 0.70, 0.90]})
    (tmp_path / "empty").mkdir()
    assert main([str(first), str(tmp_path / "empty"), "--out", str(tmp_path / "all")]) == 2
    assert "holds no run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(first), str(tmp_path / "empty"), "--out", str(first)])
