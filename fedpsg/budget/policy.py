"""A party's privacy policy: what the party itself allows, whatever the coordinator asks.

The policy is read by the party alone, from (first found wins):

1. the node config's ``policy`` (a file path),
2. ``policy.yaml`` in the party's own folder (``<state dir>/party-<partition>``; the simulation
   writes one per virtual party there),
3. the file named by ``$FEDPSG_PARTY_POLICY``,
4. the built-in default: a lifetime budget of (10, 1e-5), at most 10 per run, private methods only.

A policy file (YAML; every key optional)::

    epsilon: 40                # lifetime budget on this party's data: every release, composed
    delta: 4.0e-5
    max_run_epsilon: 10        # the most one release or run may cost
    methods: [psg, dpmerf]     # null = every private method
    trust_coordinator: false   # true: also answer non-private requests (fedavg-gan, eps = inf)
    dataset: mnist             # what this party holds; null = whatever the request names
    classes: [5, 6]            # continual scenarios: the classes it holds; null = every class
    share: {parties: 5, split: iid, seed: 0}   # federated-GAN scenarios: its share of the data

A request that the policy does not allow is refused with :class:`Refused` before any private
data is read. The lifetime budget itself is enforced by :mod:`fedpsg.budget.ledger`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from fedpsg.data.datasets import dataset_spec
from fedpsg.dp.accounting import validate_budget

POLICY_ENV = "FEDPSG_PARTY_POLICY"
STATE_DIR_ENV = "FEDPSG_PARTY_STATE_DIR"
POLICY_FILE = "policy.yaml"


class Refused(RuntimeError):
    """A party refuses a request: its policy or its remaining budget does not allow it."""

    @classmethod
    def because(cls, reason: str, *, who: str, what: str, method: str, epsilon: float, delta: float) -> Refused:
        """The refusal the coordinator reports: who refuses what was asked, and why."""
        return cls(f"{who} refuses {what} (method {method}, epsilon {epsilon:.4g}, delta {delta:g}): {reason}")


def default_state_dir() -> Path:
    """Where parties keep their policy, ledger and state: ``$FEDPSG_PARTY_STATE_DIR`` or ``~/.fedpsg/party-state``."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path.home() / ".fedpsg" / "party-state")


def party_dir(partition: int, state_dir: str | Path | None = None) -> Path:
    """The folder of the party holding ``partition``: its policy, lifetime ledgers and run state."""
    return Path(state_dir or default_state_dir()) / f"party-{partition}"


@dataclass(frozen=True)
class DataShare:
    """A federated-GAN party's share of the training set under a public split (fixed by the party)."""

    parties: int
    split: str
    seed: int


@dataclass(frozen=True)
class PartyPolicy:
    epsilon: float = 10.0
    delta: float = 1e-5
    max_run_epsilon: float | None = None  # None: the lifetime epsilon
    methods: tuple[str, ...] | None = None  # None: every private method
    trust_coordinator: bool = False
    dataset: str | None = None
    classes: tuple[int, ...] | None = None
    share: DataShare | None = None

    def __post_init__(self) -> None:
        validate_budget(self.epsilon, self.delta)
        if math.isinf(self.epsilon):
            raise ValueError("a party's lifetime epsilon must be finite (non-private answers: trust_coordinator)")
        if self.max_run_epsilon is not None and not 0 < self.max_run_epsilon <= self.epsilon:
            raise ValueError(f"max_run_epsilon must be in (0, epsilon={self.epsilon}], got {self.max_run_epsilon}")

    @property
    def run_epsilon(self) -> float:
        return self.epsilon if self.max_run_epsilon is None else self.max_run_epsilon

    @classmethod
    def from_dict(cls, values: dict) -> PartyPolicy:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown policy keys {sorted(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(values)
        if not isinstance(values.get("trust_coordinator", False), bool):  # "false" in quotes must not mean yes
            raise ValueError(f"trust_coordinator must be true or false, got {values['trust_coordinator']!r}")
        for key in ("epsilon", "delta", "max_run_epsilon"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        if values.get("methods") is not None:
            values["methods"] = tuple(str(m) for m in values["methods"])
        if values.get("classes") is not None:
            values["classes"] = tuple(int(c) for c in values["classes"])
        if values.get("share") is not None:
            share = values["share"]
            values["share"] = DataShare(int(share["parties"]), str(share["split"]), int(share["seed"]))
        return cls(**values)

    def to_dict(self) -> dict:
        values = asdict(self)
        for key in ("methods", "classes"):
            if values[key] is not None:
                values[key] = list(values[key])
        return values

    def write(self, path: str | Path, header: str = "") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def refusal(self, *, method: str, private: bool, epsilon: float, delta: float, dataset: str) -> str | None:
        """Why this policy does not allow one release or run (None: it does); only public facts are used."""
        if not private or math.isinf(epsilon):
            if not self.trust_coordinator:
                return "it is not private and this party does not trust the coordinator"
        elif epsilon > self.run_epsilon * (1 + 1e-9):
            return f"one run may cost at most epsilon {self.run_epsilon:g}"
        if delta > self.delta:
            return f"delta above the party's {self.delta:g}"
        if self.methods is not None and method not in self.methods:
            return f"the party allows only {', '.join(self.methods)}"
        if self.dataset is not None and dataset_spec(dataset).name != dataset_spec(self.dataset).name:
            return f"the party holds {self.dataset}, not {dataset}"
        return None

    def check_request(
        self, who: str, what: str, *, method: str, private: bool, epsilon: float, delta: float, dataset: str
    ) -> None:
        """Refuse a request this policy does not allow, before the party reads any private data."""
        reason = self.refusal(method=method, private=private, epsilon=epsilon, delta=delta, dataset=dataset)
        if reason:
            raise Refused.because(reason, who=who, what=what, method=method, epsilon=epsilon, delta=delta)

    def check_classes(self, who: str, what: str, classes: list[int]) -> None:
        if self.classes is not None and not set(classes) <= set(self.classes):
            raise Refused(f"{who} refuses {what}: it holds classes {list(self.classes)}, was asked about {classes}")


def load_policy(node_policy: str | None = None, home: Path | None = None) -> PartyPolicy:
    """The party's policy: the node config's file, its folder's policy.yaml, $FEDPSG_PARTY_POLICY, or the default."""
    candidates = [node_policy, home / POLICY_FILE if home is not None else None, os.environ.get(POLICY_ENV)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            try:
                return PartyPolicy.from_dict(yaml.safe_load(Path(candidate).read_text()) or {})
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"party policy {candidate}: {err}") from None
        if candidate and candidate is not candidates[1]:
            raise ValueError(f"party policy file {candidate} does not exist")
    return PartyPolicy()
