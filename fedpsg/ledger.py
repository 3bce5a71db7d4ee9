"""A party's lifetime privacy ledger: every release it ever makes on its data, composed.

    python -m fedpsg.ledger PARTY_DIR                      # releases, total (epsilon, delta), what is left
    python -m fedpsg.ledger PARTY_DIR --reset --dataset D  # start a fresh ledger (explicit only)

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

import argparse
import fcntl
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpsg.data import dataset_spec
from fedpsg.files import strict_json
from fedpsg.policy import PartyPolicy, Refused, load_policy
from fedpsg.privacy import RDP_ORDERS, PrivacyRecord


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
    status: str = "reserved"  # reserved (written before computing) -> released
    run: str = ""  # the run it belongs to, where a run spans several releases (federated GAN)

    def to_dict(self) -> dict:
        return strict_json({**asdict(self), "privacy": self.privacy.to_dict()})

    @classmethod
    def from_dict(cls, values: dict) -> Entry:
        privacy = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in values["privacy"].items()}
        return cls(**{**values, "privacy": PrivacyRecord.from_dict(privacy)})


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
        return [Entry.from_dict(e) for e in json.loads(self.path.read_text())["entries"]]

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
        return composed_epsilon([e.privacy for e in entries if e.private], delta)

    def releases(self, run: str) -> int:
        """How many releases of ``run`` the ledger holds (a crash after the write still counts)."""
        return sum(e.run == run for e in self.entries())

    def _refusal(self, entries: list[Entry], record: PrivacyRecord, policy: PartyPolicy, method: str) -> str | None:
        """Why ``policy`` does not allow ``record`` after ``entries`` (None: it fits)."""
        reason = policy.refusal(
            method=method, private=is_private(record), epsilon=record.epsilon, delta=record.delta, dataset=self.dataset
        )
        if reason or not is_private(record):
            return reason
        before = self.spent(policy.delta, entries)
        after = composed_epsilon([e.privacy for e in entries if e.private] + [record], policy.delta)
        if after > policy.epsilon * (1 + 1e-9):
            return (
                f"its lifetime budget on {self.dataset} is epsilon {policy.epsilon:g} at delta {policy.delta:g}; "
                f"{len(entries)} releases have spent {before:.4g}, {policy.epsilon - before:.4g} is left, and "
                f"this would bring the total to {after:.4g}"
            )
        return None

    def _refuse(self, reason: str, record: PrivacyRecord, method: str, purpose: str) -> Refused:
        asked = f"method {method}, epsilon {record.epsilon:.4g}, delta {record.delta:g}"
        return Refused(f"{self.who} refuses {purpose} ({asked}): {reason}")

    def check(self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str) -> None:
        """Raise :class:`Refused` if ``record`` would not fit now; writes nothing (a check before any work)."""
        reason = self._refusal(self.entries(), record, policy, method)
        if reason:
            raise self._refuse(reason, record, method, purpose)

    def reserve(
        self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str, run: str = ""
    ) -> Entry:
        """Check a planned release against ``policy`` and write it down; raise :class:`Refused` if it does not fit."""
        with self._locked():
            entries = self.entries()
            reason = self._refusal(entries, record, policy, method)
            if reason:
                raise self._refuse(reason, record, method, purpose)
            entry = Entry(
                uuid.uuid4().hex, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), purpose, method, record,
                is_private(record), run=run,
            )  # fmt: skip
            self._write([*entries, entry])
        return entry

    def mark_released(self, entry: Entry) -> None:
        with self._locked():
            self._write([replace(e, status="released") if e.id == entry.id else e for e in self.entries()])

    @contextmanager
    def release(
        self, record: PrivacyRecord, policy: PartyPolicy, *, method: str, purpose: str, run: str = ""
    ) -> Iterator[Entry]:
        """Reserve ``record``, let the caller compute the release, then mark it released.

        A failure inside leaves the entry reserved: it still counts, as the data may have been used.
        """
        entry = self.reserve(record, policy, method=method, purpose=purpose, run=run)
        yield entry
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


def describe(ledger: Ledger, policy: PartyPolicy) -> str:
    """The ledger as a user reads it: one line per release, the total and what is left."""
    entries = ledger.entries()
    lines = [f"ledger {ledger.path} ({len(entries)} releases)"]
    for e in entries:
        p = e.privacy
        own = f"eps {p.epsilon:.4g}" if e.private else "NON-PRIVATE"
        lines.append(
            f"  {e.time}  {e.status:8s} {e.purpose}: {e.method}, sigma {p.noise_multiplier:.4g}, "
            f"q {p.sample_rate:.4g}, {p.steps} steps, {p.adjacency}, {own} at delta {p.delta:g}"
        )
    spent = ledger.spent(policy.delta, entries)
    lines.append(f"total: epsilon {spent:.4f} at delta {policy.delta:g} (RDP curves composed)")
    lines.append(f"budget: epsilon {policy.epsilon:g} at delta {policy.delta:g}; left: {policy.epsilon - spent:.4f}")
    non_private = sum(not e.private for e in entries)
    if non_private:
        lines.append(f"{non_private} non-private answers (trust_coordinator): no DP guarantee against the coordinator")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpsg.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("party_dir", type=Path, help="the party's folder (<state dir>/party-<partition>)")
    parser.add_argument("--dataset", default=None, help="one ledger (default: every ledger in the folder)")
    parser.add_argument("--policy", default=None, help="policy file (default: the party's own, as the party reads it)")
    parser.add_argument("--reset", action="store_true", help="delete the ledger of --dataset (its history is lost)")
    args = parser.parse_args(argv)
    try:
        policy = load_policy(args.policy, args.party_dir)
    except ValueError as err:
        parser.error(str(err))
    if args.reset:
        if args.dataset is None:
            parser.error("--reset needs --dataset: ledgers are reset one at a time")
        Ledger(args.party_dir, args.dataset).reset()
        print(f"reset the {args.dataset} ledger of {args.party_dir}")
        return 0
    datasets = [args.dataset] if args.dataset else sorted(p.name[7:-5] for p in args.party_dir.glob("ledger-*.json"))
    if not datasets:
        print(f"no ledger in {args.party_dir}", file=sys.stderr)
        return 1
    for dataset in datasets:
        print(describe(Ledger(args.party_dir, dataset), policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
