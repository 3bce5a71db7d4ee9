import json
import subprocess
import sys

import pytest
import torch

from fedpsg.generate import main
from fedpsg.nn.evaluation import REAL_CLASSIFIERS

BAD_ARGUMENTS = [
    (["--dataset", "cifar1000"], "unknown dataset"),
    (["--eps", "0"], "--eps"),
    (["--eps", "-3"], "--eps"),
    (["--delta", "1.5"], "--delta"),
    (["--spc", "0"], "--spc"),
    (["--classes", "5,10"], "classes"),
    (["--profile", "huge"], "--profile"),
]


@pytest.mark.parametrize("argv,reason", BAD_ARGUMENTS)
def test_bad_input_fails_before_any_work_with_one_line(argv, reason, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert reason in last_line
    assert not (tmp_path / "out").exists()


def test_generate_writes_set_grid_and_summary(tmp_path, data_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fedpsg.generate", "--dataset", "fmnist", "--classes", "5,6", "--eps", "10",
         "--spc", "5", "--profile", "tiny", "--set", "psg.iterations=1",
         "--data-dir", str(data_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "accuracy on real test images" in result.stdout
    blob = torch.load(out / "release.pt", weights_only=True)
    assert blob["images"].shape == (10, 1, 28, 28)
    assert blob["privacy"]["epsilon"] == pytest.approx(10.0, rel=1e-3)
    assert {"delta", "noise_multiplier", "steps", "sample_rate", "accountant"} <= set(blob["privacy"])
    assert (out / "synthetic.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"] == blob["privacy"]
    accuracies = summary["accuracies"]  # one per classifier, the mean is what the command printed
    assert summary["accuracy_mean"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert f"{100 * summary['accuracy_mean']:.2f}%" in result.stdout
    judges = REAL_CLASSIFIERS["tiny"].num_evals  # reversed utility: one accuracy per real-data classifier
    assert len(summary["real2gen"]) == judges and 0 <= summary["real2gen_mean"] <= 1
    assert f"{100 * summary['real2gen_mean']:.2f}%" in result.stdout


def test_reversed_utility_trains_on_real_images_and_scores_the_set(data_dir):
    """real2gen by its definition: classifiers trained on real images label the synthetic set. A "set"
    of real test images with their labels scores like a real classifier; the same images with the
    two labels swapped score the complement; a set of pure noise, about chance or its bias."""
    from fedpsg.data.datasets import ImageSet, dataset_spec, load_split
    from fedpsg.nn.evaluation import EvalConfig, real_classifiers, reversed_utility

    spec = dataset_spec("mnist")
    real = load_split("mnist", "validation", validation_per_class=100, data_dir=data_dir).only_classes([0, 1])
    test = load_split("mnist", "test", validation_per_class=100, data_dir=data_dir).only_classes([0, 1])
    honest = ImageSet(test.images[:200], test.labels[:200])
    swapped = ImageSet(honest.images, 1 - honest.labels)
    judges = real_classifiers(real, spec, EvalConfig(width=16, epochs=3, augment=False, num_evals=2, batch_size=64))
    right, wrong = reversed_utility(honest, judges), reversed_utility(swapped, judges)
    assert right.mean > 0.95 and len(right.accuracies) == 2
    assert wrong.accuracies == pytest.approx([1 - a for a in right.accuracies], abs=1e-6)  # every verdict flipped
    noise = ImageSet(torch.randn(200, 1, 28, 28), honest.labels)
    assert reversed_utility(noise, judges).mean < 0.8  # noise carries no digit: one class at most
