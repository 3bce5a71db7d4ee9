"""A DP synthetic set: the only data-derived artefact that leaves a party."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.utils import save_image

from fedpsg.data.datasets import DatasetSpec, ImageSet, dataset_spec
from fedpsg.dp.accounting import PrivacyRecord
from fedpsg.io.files import save_atomically


@dataclass
class SyntheticSet:
    images: torch.Tensor  # normalised like the real data, (M, C, H, W)
    labels: torch.Tensor  # original class ids, (M,)
    dataset: str
    classes: list[int]
    privacy: PrivacyRecord
    config: dict = field(default_factory=dict)

    def as_image_set(self) -> ImageSet:
        return ImageSet(self.images.detach().cpu(), self.labels.detach().cpu())

    def save(self, path: str | Path) -> None:
        """Write atomically, so an interrupted run never leaves a half-written set behind."""
        save_atomically(
            {
                "images": self.images.detach().cpu(),
                "labels": self.labels.detach().cpu(),
                "dataset": self.dataset,
                "classes": list(self.classes),
                "privacy": self.privacy.to_dict(),
                "config": dict(self.config),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> SyntheticSet:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(
            images=blob["images"],
            labels=blob["labels"],
            dataset=blob["dataset"],
            classes=list(blob["classes"]),
            privacy=PrivacyRecord.from_dict(blob["privacy"]),
            config=dict(blob["config"]),
        )


def to_pixels(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Undo the dataset normalisation and clamp to [0, 1] for display."""
    return spec.to_pixels(images.detach().cpu()).clamp(0, 1)


def save_grid(
    images: torch.Tensor, labels: torch.Tensor, dataset: str, path: str | Path, max_per_class: int = 20
) -> None:
    """PNG grid with one row per class (up to ``max_per_class`` images each)."""
    spec = dataset_spec(dataset)
    rows = []
    classes = labels.unique(sorted=False).tolist()
    ordered = [c for c in dict.fromkeys(labels.tolist()) if c in classes]
    per_row = min(max_per_class, max(int((labels == c).sum()) for c in ordered))
    for cls in ordered:
        row = images[labels == cls][:per_row]
        if len(row) < per_row:  # pad short rows with blanks so the grid stays aligned
            row = torch.cat([row, row.new_full((per_row - len(row), *row.shape[1:]), -math.inf)])
        rows.append(row)
    grid = to_pixels(torch.cat(rows), spec)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path), nrow=per_row, padding=2, pad_value=1.0)
