"""The continual run as a graph of jobs: which party stage or evaluation may start now.

A run is one party job and one evaluation job per (method, stage). A party job may start when
its inputs exist and its party is free:

- a method that ``uses_earlier_sets`` (PSG) needs its own stages 1..k-1 received;
- a method that releases a model (DP-SGD) finetunes the model of stage k-1: it needs that one;
- every other method's stages need nothing from each other (DP-Merf, dpdm, GS-WGAN).

A party (partition k-1 holds stage k's classes) runs one job at a time, and at most
``capacity`` party jobs are in flight. An evaluation may start when its stage is received and,
for a method whose sets are replayed, every earlier stage of that method is received; with
``replay: continue`` it also needs the previous stage's evaluation (it continues that model).
Evaluations run beside the party jobs, off the critical path.

Among ready party jobs, the ones on a chain (a method whose stage k waits for stage k-1) go
first: the longest chain sets the run's length, the independent stages fill the gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpsg.methods import get_method

Job = tuple[str, int]  # (method, stage)


def is_chained(method: str) -> bool:
    """Whether the method's stage k needs its stage k-1 (earlier sets or the previous model)."""
    plugin = get_method(method)
    return plugin.uses_earlier_sets or plugin.releases == "model"


@dataclass
class StageGraph:
    methods: list[str]
    num_stages: int
    capacity: int = 1  # party jobs in flight at once
    continue_replay: bool = False  # replay "continue": evaluation k trains on from evaluation k-1
    received: set[Job] = field(default_factory=set)  # the party's reply is stored
    evaluated: set[Job] = field(default_factory=set)  # the stage's row is written
    running: set[Job] = field(default_factory=set)  # party jobs in flight
    evaluating: set[Job] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")

    @property
    def jobs(self) -> list[Job]:
        return [(m, k) for m in self.methods for k in range(1, self.num_stages + 1)]

    def finished(self) -> bool:
        return len(self.evaluated) == len(self.jobs)

    def party_ready(self) -> list[Job]:
        """Party jobs that may start now, best first, within the free capacity and parties."""
        busy = {stage for _, stage in self.running}
        candidates = []
        for method, stage in self.jobs:
            job = (method, stage)
            if job in self.received or job in self.running:
                continue
            if stage > 1 and is_chained(method) and (method, stage - 1) not in self.received:
                continue
            candidates.append(job)
        # Chains first (in the scenario's method order), then by stage, then method order.
        order = {m: i for i, m in enumerate(self.methods)}
        candidates.sort(key=lambda j: (not is_chained(j[0]), j[1], order[j[0]]))
        ready = []
        for method, stage in candidates:
            if len(self.running) + len(ready) >= self.capacity:
                break
            if stage not in busy:
                ready.append((method, stage))
                busy.add(stage)
        return ready

    def evaluation_ready(self) -> list[Job]:
        """Evaluations whose inputs are all stored, in (stage, method) order."""
        ready = []
        for method, stage in sorted(self.jobs, key=lambda j: (j[1], self.methods.index(j[0]))):
            job = (method, stage)
            if job in self.evaluated or job in self.evaluating or job not in self.received:
                continue
            if any((method, k) not in self.received for k in range(1, stage)):
                continue
            if self.continue_replay and stage > 1 and (method, stage - 1) not in self.evaluated:
                continue
            ready.append(job)
        return ready
