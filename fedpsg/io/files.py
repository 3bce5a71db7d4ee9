"""Writing files so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(partial_path)``, then rename the partial file to ``path`` (atomic on POSIX).

    The partial file is named per process: processes writing the same file at once (parties
    caching the same feature network) each rename a whole file; the last one wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    partial.replace(path)
    return path


def save_atomically(value: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`write_atomically`."""
    return write_atomically(path, lambda partial: torch.save(value, partial))


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda partial: partial.write_text(text))


def strict_json(value: Any) -> Any:
    """``value`` with infinite epsilons (non-private runs) and NaNs as strings: valid strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """``value`` as indented strict JSON (infinite epsilons as strings), written atomically."""
    return write_text_atomically(path, json.dumps(strict_json(value), indent=2, default=str, allow_nan=False))


def write_csv(path: str | Path, frame: Any) -> Path:
    """A pandas frame as CSV without its index, written atomically."""
    return write_atomically(path, lambda partial: frame.to_csv(partial, index=False))
