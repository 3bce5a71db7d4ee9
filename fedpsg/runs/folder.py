"""A run folder and its parties, for both scenario kinds: resume checks, the run log, party errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from fedpsg.io.files import write_json


class ResumeMismatchError(RuntimeError):
    """The output folder holds a run with different settings."""


class PartyError(RuntimeError):
    """A party failed or did not answer in time."""


class PartyUnavailable(PartyError):
    """The party's node went away (or never answered): worth waiting for it to come back."""


class RunIdentity(Protocol):
    """Settings of either scenario kind, as far as their run folder is concerned."""

    @property
    def out(self) -> Path: ...

    def identity(self) -> dict: ...


def stored_run(out: Path, wanted: dict) -> dict | None:
    """The identity stored in ``out/config.json`` (None if there is no run there); raises if it
    is a different run. Settings must match, except that under ``methods`` only the methods
    both runs have must agree (a run can be resumed with methods added)."""
    config_path = out / "config.json"
    if not config_path.exists():
        return None
    found = json.loads(config_path.read_text())
    changed = sorted(k for k in wanted if k != "methods" and found.get(k) != wanted.get(k))
    found_methods = found.get("methods", {})
    changed += sorted(
        m for m, values in wanted.get("methods", {}).items() if m in found_methods and found_methods[m] != values
    )
    if changed:
        raise ResumeMismatchError(
            f"{out} holds a run with different settings ({', '.join(changed)}); use another --out or delete it"
        )
    return found


def check_resumable(settings: RunIdentity) -> bool:
    """True if ``settings.out`` holds a run to resume; raise if it holds a different run."""
    return stored_run(settings.out, settings.identity()) is not None


class RunFolder:
    """A run's output folder: ``config.json`` (what the results are of), ``run.log`` and ``DONE``."""

    def __init__(self, out: Path, identity: dict) -> None:
        self.out, self.identity = out, identity

    def open(self) -> bool:
        """Check ``config.json`` against the identity (raise if the folder holds another run), then
        write it; True if a run is resumed. Stored ``methods`` the identity lacks are kept: a run
        resumed with other methods still holds the first ones' results."""
        found = stored_run(self.out, self.identity)
        identity = dict(self.identity)
        if found is not None and "methods" in identity:
            identity["methods"] = {**found.get("methods", {}), **identity["methods"]}
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", identity)
        return found is not None

    @contextmanager
    def running(self) -> Iterator[None]:
        """The run log while the run lasts, and ``DONE`` only if it completes (an exception leaves none)."""
        done = self.out / "DONE"
        done.unlink(missing_ok=True)  # written again only if this run completes
        with run_log(self.out / "run.log"):
            yield
            done.write_text("completed\n")


# The run log that the records of the current thread belong to. Several runs can share a process
# (repetitions side by side): each log keeps the records of its own run's threads, and those of
# threads outside any run (shared infrastructure). A run's worker threads get it by in_run_context.
_CURRENT_RUN_LOG: ContextVar[Path | None] = ContextVar("fedpsg_current_run_log", default=None)

T = TypeVar("T")


def in_run_context(function: Callable[..., T]) -> Callable[..., T]:
    """``function``, to be called in another thread as part of the calling thread's run (its log)."""
    return partial(copy_context().run, function)


class _RecordsOfRun(logging.Filter):
    def __init__(self, path: Path, level_before: int) -> None:
        super().__init__()
        self.path = path
        self.level_before = level_before  # the fedpsg logger's level before the first run log

    def filter(self, record: logging.LogRecord) -> bool:
        current = _CURRENT_RUN_LOG.get()
        return current is None or current == self.path


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Copy the fedpsg loggers' INFO lines of this run into the run folder's run.log while the run lasts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedpsg")
    others = _run_logs(root)
    handler.addFilter(_RecordsOfRun(path, others[0].level_before if others else root.level))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    token = _CURRENT_RUN_LOG.set(path)
    try:
        yield
    finally:
        _CURRENT_RUN_LOG.reset(token)
        root.removeHandler(handler)
        if not _run_logs(root):  # the last run of those side by side puts the level back
            root.setLevel(handler.filters[0].level_before)
        handler.close()


def _run_logs(logger: logging.Logger) -> list[_RecordsOfRun]:
    return [f for h in logger.handlers for f in h.filters if isinstance(f, _RecordsOfRun)]
