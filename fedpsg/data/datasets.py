"""Datasets, their three disjoint splits, and class-incremental stages.

Images come from torchvision's MNIST / FashionMNIST classes. The data root is, in order:
the ``--data-dir`` flag, the ``FEDPSG_DATA_DIR`` variable, Debian's ``dataset-fashion-mnist``
package (FashionMNIST only), and finally torchvision's download into ``./data``.

Splits (:func:`load_split`): ``validation`` is a fixed, publicly seeded choice of
``validation_per_class`` training images per class that belongs to the evaluator, never to a
party: hyperparameters are chosen on it, so the choice costs no party privacy and never sees
the test images. ``private`` is the rest of the training split (what parties hold), ``test``
the test split (reported, never used to choose).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from fedpsg.io.files import write_atomically

DATA_DIR_ENV = "FEDPSG_DATA_DIR"
DEFAULT_DOWNLOAD_DIR = Path("data")
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CLASS_ORDER = (5, 6, 1, 2, 0, 8, 9, 3, 4, 7)
SPLITS = ("private", "validation", "test")
# 500 per class: MNIST's classic 55,000 / 5,000 train / validation split; the seed is public.
DEFAULT_VALIDATION_PER_CLASS = 500
VALIDATION_SEED = 5000


class DataNotFoundError(RuntimeError):
    """The dataset is not on disk and could not be downloaded."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    torchvision_class: type[datasets.MNIST]
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` pixels ``(N, C, H, W)`` -> the normalised images every model sees."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalise` (not clamped)."""
        mean, std = self._stats(images)
        return images * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (
            torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape),
            torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape),
        )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", datasets.MNIST, 1, (28, 28), 10, (0.1307,), (0.3081,)),
    "fmnist": DatasetSpec("fmnist", datasets.FashionMNIST, 1, (28, 28), 10, (0.2861,), (0.3530,)),
}
_ALIASES = {"fashionmnist": "fmnist", "fashion_mnist": "fmnist", "fashion-mnist": "fmnist"}


def dataset_spec(name: str) -> DatasetSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


@dataclass(frozen=True)
class ImageSet:
    """Normalised images ``(N, C, H, W)`` float32 with integer labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def only_classes(self, classes: list[int] | tuple[int, ...]) -> ImageSet:
        """The subset whose labels are in ``classes`` (a party's partition)."""
        keep = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=self.labels.dtype))
        return ImageSet(self.images[keep], self.labels[keep])


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit data root: the flag, else ``FEDPSG_DATA_DIR``, else None."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def _torchvision_folder(spec: DatasetSpec) -> str:
    return spec.torchvision_class.__name__  # "MNIST" / "FashionMNIST"


def _has_raw_files(root: Path, spec: DatasetSpec) -> bool:
    raw = root / _torchvision_folder(spec) / "raw"
    return all((raw / name).exists() for name in _raw_file_names())


def _gunzip(source: Path, target: Path) -> None:
    with gzip.open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _raw_file_names() -> list[str]:
    return [
        f"{split}-{kind}-idx{dim}-ubyte" for split in ("train", "t10k") for kind, dim in (("images", 3), ("labels", 1))
    ]


def _debian_fashion_mnist_root(cache_dir: Path) -> Path | None:
    """Unpack Debian's gzipped FashionMNIST files into torchvision's layout under ``cache_dir``."""
    if not all((DEBIAN_FASHION_MNIST_DIR / f"{n}.gz").exists() for n in _raw_file_names()):
        return None
    raw = cache_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in _raw_file_names():
        target = raw / name
        if not target.exists():
            source = DEBIAN_FASHION_MNIST_DIR / f"{name}.gz"
            write_atomically(target, lambda partial, source=source: _gunzip(source, partial))
    return cache_dir


def locate_root(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Where to read ``spec`` from, and whether torchvision must download it there."""
    explicit = resolve_data_dir(data_dir)
    if explicit is not None:
        if _has_raw_files(explicit, spec):
            return explicit, False
        return explicit, True
    if _has_raw_files(DEFAULT_DOWNLOAD_DIR, spec):
        return DEFAULT_DOWNLOAD_DIR, False
    if spec.name == "fmnist":
        debian_root = _debian_fashion_mnist_root(Path.home() / ".cache" / "fedpsg" / "debian")
        if debian_root is not None:
            return debian_root, False
    return DEFAULT_DOWNLOAD_DIR, True


def load_images(name: str, train: bool, data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Load a whole split of ``name`` as normalised tensors."""
    spec = dataset_spec(name)
    root, download = locate_root(spec, data_dir)
    try:
        tv = spec.torchvision_class(str(root), train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError / URLError / OSError offline
        raise DataNotFoundError(
            f"{_torchvision_folder(spec)} not found under {root} and could not be downloaded ({err}). "
            f"Pass --data-dir or set {DATA_DIR_ENV} to a folder holding "
            f"{_torchvision_folder(spec)}/raw/*-ubyte (torchvision's layout)"
            + (
                f", or install Debian's package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST_DIR})."
                if spec.name == "fmnist"
                else "."
            )
        ) from err
    pixels = tv.data.unsqueeze(1).float().div_(255.0)
    return ImageSet(spec.normalise(pixels), tv.targets.clone().long())


def validation_indices(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Positions (sorted) of ``per_class`` examples of every class, drawn with the public seed."""
    if per_class < 0:
        raise ValueError(f"validation_per_class must be >= 0, got {per_class}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    chosen = []
    for cls in labels.unique().tolist():
        members = order[labels[order] == cls]
        if len(members) <= per_class:
            raise ValueError(f"class {cls} has {len(members)} training images; cannot hold out {per_class}")
        chosen.append(members[:per_class])
    return torch.cat(chosen).sort().values


def load_split(
    name: str, split: str, *, validation_per_class: int, data_dir: str | os.PathLike | None = None
) -> ImageSet:
    """The ``private``, ``validation`` or ``test`` split of ``name`` (see the module's docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        return load_images(name, train=False, data_dir=data_dir)
    train = load_images(name, train=True, data_dir=data_dir)
    held = torch.zeros(len(train), dtype=torch.bool)
    held[validation_indices(train.labels, validation_per_class)] = True
    keep = held if split == "validation" else ~held
    return ImageSet(train.images[keep], train.labels[keep])


def stage_classes(class_order: list[int] | tuple[int, ...], classes_per_stage: int) -> list[list[int]]:
    """Split a class order into consecutive, disjoint stages of ``classes_per_stage`` classes."""
    order = list(class_order)
    if classes_per_stage < 1:
        raise ValueError("classes_per_stage must be >= 1")
    if len(set(order)) != len(order):
        raise ValueError(f"class order has repeated classes: {order}")
    if len(order) % classes_per_stage:
        raise ValueError(f"{len(order)} classes do not split into stages of {classes_per_stage}")
    return [order[i : i + classes_per_stage] for i in range(0, len(order), classes_per_stage)]


def partition_class_indices(data: ImageSet, classes: list[int] | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A party's class ids as a tensor, and each example's position in ``classes`` (0..len-1).

    For methods that model one output per held class: rejects repeated classes and data holding
    labels outside ``classes`` (the party must pass its own partition).
    """
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and distinct, got {classes}")
    class_ids = torch.as_tensor(classes, dtype=data.labels.dtype)
    if not torch.isin(data.labels, class_ids).all():
        raise ValueError(f"data holds labels outside {classes}; pass the party's partition")
    return class_ids, (data.labels.view(-1, 1) == class_ids.view(1, -1)).int().argmax(dim=1)


def validate_classes(classes: list[int] | tuple[int, ...], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"classes must be non-empty and in 0..{num_classes - 1}, got {list(classes)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat: {list(classes)}")
