"""Which training images each party holds: the simulation's stand-in for data that parties own.

The split is a public function of the scenario (number of parties, kind of split, seed), like
the continual scenarios' class order, so the coordinator knows each party's classes (it asks a
party only about classes it holds) but never sees the images.
"""

from __future__ import annotations

import torch


def party_classes(num_parties: int, num_classes: int, split: str) -> list[list[int]]:
    """The classes each party holds: all of them (iid), or disjoint ones (by-class).

    by-class with fewer parties than classes deals the classes round-robin (5 parties x 2
    classes on MNIST); with more parties, party ``p`` holds class ``p mod C`` and the parties
    of one class share its images.
    """
    if split == "iid":
        return [list(range(num_classes)) for _ in range(num_parties)]
    if split == "by-class":
        if num_parties <= num_classes:
            return [list(range(p, num_classes, num_parties)) for p in range(num_parties)]
        return [[p % num_classes] for p in range(num_parties)]
    raise ValueError(f"unknown split {split!r}; available: iid, by-class")


def party_indices(labels: torch.Tensor, num_parties: int, split: str, seed: int) -> list[torch.Tensor]:
    """Disjoint indices into ``labels`` for every party (every example belongs to exactly one party)."""
    num_classes = int(labels.max()) + 1
    holders: dict[int, list[int]] = {}
    for party, classes in enumerate(party_classes(num_parties, num_classes, split)):
        for cls in classes:
            holders.setdefault(cls, []).append(party)
    generator = torch.Generator().manual_seed(seed)
    shares: list[list[torch.Tensor]] = [[] for _ in range(num_parties)]
    for cls, parties in holders.items():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for party, chunk in zip(parties, members.tensor_split(len(parties))):
            shares[party].append(chunk)
    return [torch.sort(torch.cat(share)).values if share else torch.empty(0, dtype=torch.long) for share in shares]
