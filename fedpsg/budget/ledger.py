"""A party's lifetime privacy ledger: every release it ever makes on its data, composed.

One ledger per dataset a party holds (``<party dir>/ledger-<dataset>.json``), whoever asks and
whatever run id they give: continual stages, federated-GAN rounds, audits and ``generate`` runs
on the same data all land in it. Each entry keeps the mechanism's parameters (noise multiplier,
sample rate, steps, adjacency); the total is their RDP curves added order by order and converted
to epsilon at the policy's delta (never a sum of epsilons), so releases of different mechanisms
compose exactly as the accountant composes one run's steps.

:meth:`Ledger.reserve` checks a planned release against the party's policy and writes it, under
an exclusive file lock and with an atomic, synced write, *before* the release is computed: a crash
afterwards still counts it, and concurrent requests (threads, processes, restarts) cannot spend
the same budget twice. Non-private answers (allowed only by ``trust_coordinator``) are recorded
too, but carry no DP guarantee; the DP total composes the private entries.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpsg.budget.policy import PartyPolicy, Refused
from fedpsg.data.datasets import dataset_spec
from fedpsg.dp.accounting import RDP_ORDERS, PrivacyRecord
from fedpsg.io.files import strict_json


def rdp_curve(record: PrivacyRecord) -> np.ndarray:
    """The record's RDP at every order of :data:`RDP_ORDERS` (inf for a non-private record)."""
    if record.noise_multiplier <= 0:
        return np.full(len(RDP_ORDERS), math.inf)
    rdp = rdp_analysis.compute_rdp(
        q=record.sample_rate, noise_multiplier=record.noise_multiplier, steps=record.steps, orders=RDP_ORDERS
    )
    return np.asarray(rdp, dtype=float)


def composed_epsilon(records: list[PrivacyRecord], delta: float) -> float:
    """Epsilon at ``delta`` of all ``records`` composed (RDP curves added order by order)."""
    if not records:
        return 0.0
    total = np.sum([rdp_curve(r) for r in records], axis=0)
    if not np.isfinite(total).any():
        return math.inf
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(epsilon)


@dataclass(frozen=True)
class Entry:
    id: str
    time: str  # UTC, ISO 8601
    purpose: str  # e.g. "psg stage 2 (classes [1, 2])", "fed-gswgan round 7 of run 'x'"
    method: str
    privacy: PrivacyRecord
    private: bool
    # reserved (written before computing) -> released (marked before the reply leaves), or failed (an
    # error reply left instead; counted too); a reservation whose process died before either is
    # "abandoned": nothing left the party, and it is not counted.
    status: str = "reserved"
    run: str = ""  # the run it belongs to, where a run spans several releases (federated GAN)
    owner: str = ""  # the process computing it: "pid:start time"

    def to_dict(self) -> dict:
        return strict_json({**asdict(self), "privacy": self.privacy.to_dict()})

    @classmethod
    def from_dict(cls, values: dict) -> Entry:
        privacy = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in values["privacy"].items()}
        return cls(**{**values, "privacy": PrivacyRecord.from_dict(privacy)})


def _start_time(pid: int) -> str:
    """When process ``pid`` started (Linux's /proc), "" if it does not exist or cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> str:
    """Names the running process, also across process-id reuse: its id and its start time."""
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _abandoned(entry: Entry) -> bool:
    """A reservation whose process is gone: it died before marking the release, so no reply left."""
    pid, _, started = entry.owner.partition(":")
    return entry.status == "reserved" and bool(started) and _start_time(int(pid)) != started


def is_private(record: PrivacyRecord) -> bool:
    return record.noise_multiplier > 0 and not math.isinf(record.epsilon)


class Ledger:
    """The lifetime ledger of one party's data (``<party dir>/ledger-<dataset>.json``).

    The dataset is named canonically (``MNIST``, ``mnist``: one ledger), so no spelling of a request
    opens a fresh one.
    """

    def __init__(self, party_folder: str | Path, dataset: str, who: str = "this party") -> None:
        self.folder, self.dataset, self.who = Path(party_folder), dataset_spec(dataset).name, who
        self.path = self.folder / f"ledger-{self.dataset}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with exclusive_lock(self.path):
            yield

    def entries(self) -> list[Entry]:
        if not self.path.exists():
            return []
        entries = [Entry.from_dict(e) for e in json.loads(self.path.read_text())["entries"]]
        return [replace(e, status="abandoned") if _abandoned(e) else e for e in entries]

    def _write(self, entries: list[Entry]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w") as file:
            json.dump({"dataset": self.dataset, "entries": [e.to_dict() for e in entries]}, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        partial.replace(self.path)
        folder = os.open(self.folder, os.O_RDONLY)  # the rename itself must survive a power loss
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def spent(self, delta: float, entries: list[Entry] | None = None) -> float:
        """Epsilon at ``delta`` of every private release so far."""
        entries = self.entries() if entries is None else entries
        return composed_epsilon([e.privacy for e in entries if e.private and e.status != "abandoned"], delta)

    def releases(self, run: str) -> int:
        """How many releases of ``run`` the ledger holds (one being computed counts, an abandoned one not)."""
        return sum(e.run == run and e.status != "abandoned" for e in self.entries())

    def _refusal(self, entries: list[Entry], record: PrivacyRecord, policy: PartyPolicy, method: str) -> str | None:
        """Why ``policy`` does not allow ``record`` after ``entries`` (None: it fits)."""
        reason = policy.refusal(
            method=method, private=is_private(record), epsilon=record.epsilon, delta=record.delta, dataset=self.dataset
        )
        if reason or not is_private(record):
            return reason
        before = self.spent(policy.delta, entries)
        counted = [e.privacy for e in entries if e.private and e.status != "abandoned"]
        after = composed_epsilon([*counted, record], policy.delta)
        if after > policy.epsilon * (1 + 1e-9):
            return (
                f"its lifetime budget on {self.dataset} is epsilon {policy.epsilon:g} at delta {policy.delta:g}; "
                f"{sum(e.status != 'abandoned' for e in entries)} releases have spent {before:.4g}, "
                f"{policy.epsilon - before:.4g} is left, and "
                f"this would bring the total to {after:.4g}"
            )
        return None

    def _refused(self, reason: str, record: PrivacyRecord, method: str, purpose: str) -> Refused:
        return Refused.because(
            reason, who=self.who, what=purpose, method=method, epsilon=record.epsilon, delta=record.delta
        )

    def check(self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str) -> None:
        """Raise :class:`Refused` if ``record`` would not fit now; writes nothing (a check before any work)."""
        reason = self._refusal(self.entries(), record, policy, method)
        if reason:
            raise self._refused(reason, record, method, purpose)

    def reserve(self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str, run: str = "") -> Entry:
        """Check a planned release against ``policy`` and write it down; raise :class:`Refused` if it does not fit."""
        with self._locked():
            entries = self.entries()
            reason = self._refusal(entries, record, policy, method)
            if reason:
                raise self._refused(reason, record, method, purpose)
            entry = Entry(
                uuid.uuid4().hex, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), purpose, method, record,
                is_private(record), run=run, owner=this_process(),
            )  # fmt: skip
            self._write([*entries, entry])
        return entry

    def mark_released(self, entry: Entry) -> None:
        self._mark(entry, "released")

    def _mark(self, entry: Entry, status: str) -> None:
        with self._locked():
            self._write([replace(e, status=status) if e.id == entry.id else e for e in self.entries()])

    @contextmanager
    def release(
        self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str, run: str = ""
    ) -> Iterator[Entry]:
        """Reserve ``record``, let the caller compute the release, then mark it released.

        An error inside marks the entry failed, and it still counts: the error's reply leaves the party.
        """
        entry = self.reserve(record, policy, method=method, purpose=purpose, run=run)
        try:
            yield entry
        except BaseException:
            self._mark(entry, "failed")
            raise
        self.mark_released(entry)

    def reset(self) -> None:
        with self._locked():
            self.path.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (``<path>.lock``): across threads, processes and restarts.

    The operating system releases it when the file closes, also when the process dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
