"""The memorisation report flags a release that copies training images, and not fresh images."""

import json

import pytest
import torch

from fedpsg.audit.cli import main as audit_main
from fedpsg.audit.memorisation import measure_memorisation
from fedpsg.data.datasets import ImageSet, dataset_spec, load_images
from fedpsg.data.synthetic import SyntheticSet
from fedpsg.dp.accounting import PrivacyRecord

CLASSES = [5, 6]


@pytest.fixture(scope="module")
def mnist(data_dir):
    train = load_images("mnist", train=True, data_dir=data_dir).only_classes(CLASSES)
    test = load_images("mnist", train=False, data_dir=data_dir).only_classes(CLASSES)
    return train, test


def _per_class(images: ImageSet, count: int, offset: int = 0) -> ImageSet:
    picks = [torch.nonzero(images.labels == c).flatten()[offset : offset + count] for c in CLASSES]
    index = torch.cat(picks)
    return ImageSet(images.images[index], images.labels[index])


def test_copies_of_training_images_are_flagged(mnist):
    train, test = mnist
    copies = _per_class(train, 10)
    copies = ImageSet(copies.images + 1e-3 * torch.randn_like(copies.images), copies.labels)
    report = measure_memorisation(copies, train, test, dataset_spec("mnist")).summary()
    assert report["released"] == 20
    assert report["near_copies"] == 20
    assert report["median_copy_distance"] < 0.1  # pixels in [0, 1]; a fresh digit is several units away


def test_copies_are_closer_to_train_when_the_pools_hold_them(mnist):
    train, test = mnist
    small_train = _per_class(train, 100)  # pools of 100 per class: every training image is in them
    copies = _per_class(small_train, 10, offset=20)
    report = measure_memorisation(copies, small_train, _per_class(test, 100), dataset_spec("mnist")).summary()
    assert report["share_closer_to_train"] == 1.0
    assert report["median_ratio"] < 0.01


def test_fresh_images_are_not_flagged(mnist):
    train, test = mnist
    # Held-out images the report's test pool does not contain stand in for a private release.
    pool, fresh = _per_class(test, 400), _per_class(test, 10, offset=500)
    report = measure_memorisation(fresh, train, pool, dataset_spec("mnist")).summary()
    assert report["near_copies"] <= 2
    assert 0.2 <= report["share_closer_to_train"] <= 0.8
    assert 0.7 < report["median_ratio"] < 1.3


def _leaky_run(tmp_path, train):
    """A run folder whose one released set copies training images."""
    run = tmp_path / "run"
    (run / "sets" / "leaky").mkdir(parents=True)
    config = {"scenario": {"dataset": "mnist", "class_order": [5, 6, 1, 2, 0, 8, 9, 3, 4, 7], "classes_per_stage": 2}}
    (run / "config.json").write_text(json.dumps(config))
    copies = _per_class(train, 5)
    record = PrivacyRecord(epsilon=10, delta=1e-5, noise_multiplier=1.0, steps=1, sample_rate=1.0, accountant="rdp")
    SyntheticSet(copies.images, copies.labels, "mnist", CLASSES, record).save(run / "sets" / "leaky" / "stage1.pt")
    return run


def test_run_folder_report_names_the_copying_set(tmp_path, data_dir, mnist):
    run = _leaky_run(tmp_path, mnist[0])
    out = tmp_path / "chosen"
    assert audit_main([str(run), "--data-dir", str(data_dir), "--out", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    (row,) = report["memorisation"]
    assert (row["method"], row["stage"], row["near_copies"]) == ("leaky", 1, 10)
    assert (out / row["picture"]).stat().st_size > 0
    assert "| leaky | 1 | 10 |" in (out / "audit.md").read_text()


def test_the_run_folder_audit_keeps_private_data_out_of_the_run_folder(tmp_path, data_dir, mnist, capsys):
    # The run folder is DP output (shareable); nearest training images and distances are not.
    run = _leaky_run(tmp_path, mnist[0])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert audit_main([str(run), "--data-dir", str(data_dir)]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    out = tmp_path / "run.private-audit"
    assert {"audit.json", "audit.md", "README.txt", "leaky-stage1-nearest.png"} <= {p.name for p in out.iterdir()}
    assert "DO NOT SHARE" in (out / "README.txt").read_text()
    assert f"PRIVATE: {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # nor when asked to
        audit_main([str(run), "--data-dir", str(data_dir), "--out", str(run / "audit")])
    assert "inside the run folder" in capsys.readouterr().err
    assert not (run / "audit").exists()


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        audit_main([str(tmp_path)])
    assert "not a run folder" in capsys.readouterr().err
