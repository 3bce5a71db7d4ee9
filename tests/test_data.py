import pytest
import torch
from torchvision import datasets

from fedpsg.data.datasets import (
    DEFAULT_CLASS_ORDER,
    DataNotFoundError,
    dataset_spec,
    load_images,
    load_split,
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


def test_validation_split_is_balanced_disjoint_from_the_private_split_and_fixed(data_dir):
    train = load_images("mnist", train=True, data_dir=data_dir)
    private = load_split("mnist", "private", validation_per_class=500, data_dir=data_dir)
    validation = load_split("mnist", "validation", validation_per_class=500, data_dir=data_dir)
    assert torch.equal(validation.labels.bincount(), torch.full((10,), 500))
    assert torch.equal(private.labels.bincount() + validation.labels.bincount(), train.labels.bincount())

    def fingerprints(images: torch.Tensor) -> list[float]:
        return sorted((images.flatten(1) * torch.arange(784.0)).sum(1).tolist())

    # Together exactly the training split (as a multiset of images), so disjoint; not a class block.
    assert fingerprints(torch.cat([private.images, validation.images])) == fingerprints(train.images)
    assert not torch.equal(validation.images[validation.labels == 0], train.images[train.labels == 0][:500])
    again = load_split("mnist", "validation", validation_per_class=500, data_dir=data_dir)
    assert torch.equal(again.images, validation.images)  # a public, fixed draw: every party agrees
    test = load_split("mnist", "test", validation_per_class=500, data_dir=data_dir)
    assert len(test) == 10000
    with pytest.raises(ValueError, match="cannot hold out"):
        load_split("mnist", "private", validation_per_class=6000, data_dir=data_dir)
    with pytest.raises(ValueError, match="split must be"):
        load_split("mnist", "train", validation_per_class=500, data_dir=data_dir)


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
