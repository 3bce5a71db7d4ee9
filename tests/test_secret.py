"""fedpsg.dp.secret.public_seed leaves no generator seeded with the public seed (checked without a GPU)."""

from __future__ import annotations

import contextlib

import torch

from fedpsg.dp import secret


def test_public_seed_reseeds_no_cuda_generator_it_does_not_restore(monkeypatch):
    # Pretend two CUDA devices and record which generators get seeded and which fork_rng
    # restores: a seeded but unrestored generator would keep the public seed afterwards.
    real_fork_rng = torch.random.fork_rng
    restored: list[int] = []
    seeded: list[int] = []

    @contextlib.contextmanager
    def recording_fork_rng(devices=None, **kwargs):
        restored.extend(range(2) if devices is None else devices)
        with real_fork_rng(devices=[]):  # the CPU generator, really
            yield

    class RecordingGenerator:
        def __init__(self, index: int) -> None:
            self.index = index

        def manual_seed(self, seed: int) -> None:
            seeded.append(self.index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", recording_fork_rng)
    monkeypatch.setattr(torch.cuda, "default_generators", (RecordingGenerator(0), RecordingGenerator(1)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.extend(range(2)))  # torch.manual_seed's
    for devices in [(), (1,)]:
        torch.manual_seed(123)
        expected = torch.rand(2)
        torch.manual_seed(123)
        restored.clear()
        seeded.clear()
        with secret.public_seed(7, devices):
            first = torch.rand(3)
        assert torch.equal(torch.rand(2), expected)  # the CPU generator is restored
        with secret.public_seed(7, devices):
            assert torch.equal(torch.rand(3), first)  # and seeded
        assert set(seeded) <= set(restored), (devices, seeded, restored)
        assert set(devices) <= set(seeded)  # the devices asked for are seeded too
