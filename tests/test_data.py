import pytest
import torch
from torchvision import datasets

from fedpsg.data.datasets import (
    DEFAULT_CLASS_ORDER,
    DataNotFoundError,
    dataset_spec,
    load_images,
    stage_classes,
    validate_classes,
)


def test_default_order_gives_five_disjoint_stages_covering_all_classes():
    stages = stage_classes(DEFAULT_CLASS_ORDER, 2)
    assert stages == [[5, 6], [1, 2], [0, 8], [9, 3], [4, 7]]
    flat = [c for stage in stages for c in stage]
    assert sorted(flat) == list(range(10))


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_partitions_hold_only_their_classes_and_are_disjoint(name, data_dir):
    train = load_images(name, train=True, data_dir=data_dir)
    assert train.images.shape == (60000, 1, 28, 28)
    # normalised: roughly zero mean, unit std over the whole training set
    assert abs(float(train.images.mean())) < 0.05
    assert abs(float(train.images.std()) - 1) < 0.05
    seen_images = 0
    fingerprints = []
    for classes in stage_classes(DEFAULT_CLASS_ORDER, 2):
        part = train.only_classes(classes)
        assert set(part.labels.unique().tolist()) == set(classes)
        assert len(part) == int(torch.isin(train.labels, torch.tensor(classes)).sum())
        seen_images += len(part)
        fingerprints.append(set(part.images.flatten(1).sum(1).tolist()[:200]))
    assert seen_images == len(train)
    for i in range(len(fingerprints)):
        for j in range(i + 1, len(fingerprints)):
            assert not (fingerprints[i] & fingerprints[j]) or len(fingerprints[i] & fingerprints[j]) < 3


def test_bad_splits_and_classes_rejected():
    with pytest.raises(ValueError):
        stage_classes([0, 1, 2], 2)
    with pytest.raises(ValueError):
        stage_classes([0, 0, 1, 2], 2)
    with pytest.raises(ValueError):
        validate_classes([3, 10], 10)
    with pytest.raises(ValueError):
        validate_classes([], 10)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_spec("cifar100")


def test_missing_data_offline_names_flag_variable_and_package(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(DataNotFoundError) as err:
        load_images("fmnist", train=True, data_dir=tmp_path)
    message = str(err.value)
    assert "--data-dir" in message and "FEDPSG_DATA_DIR" in message and "dataset-fashion-mnist" in message


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("FEDPSG_DATA_DIR", str(data_dir))
    assert len(load_images("mnist", train=False)) == 10000
