"""The party's secret randomness: what every DP guarantee in fedpsg rests on.

A DP release is only private against someone who cannot replay its random draws. Which
examples a Poisson batch holds and the Gaussian noise added to a clipped sum must therefore
come from a source the party alone knows: a generator seeded, per release, from the operating
system's CSPRNG (``secrets``), never from the run's public seed, and never sent, logged or
saved. The public seed in a request drives only public randomness (network and synthetic-image
initialisation, evaluation), which the coordinator may know.

Library functions take these generators as explicit arguments whose default is a fresh
:class:`SecretRandomness`, so a unit test can still pin them locally with :meth:`SecretRandomness.fixed`.

The generators are PyTorch's (Mersenne Twister on CPU, Philox on CUDA) seeded with 63 bits
of OS entropy: unpredictable to anyone without the seed, but not a cryptographically secure
stream. Opacus's ``secure_mode`` (torchcsprng) closes that gap and the floating-point attack
on Gaussian sampling; see the README's threat model.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _os_entropy_seed() -> int:
    """63 bits from the OS CSPRNG (torch seeds are signed 64-bit)."""
    return secrets.randbits(63)


@contextmanager
def public_seed(seed: int, cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """Seed torch's global RNG for a block of *public* randomness (layer initialisation,
    starting images) and restore it afterwards, so nothing else's draws depend on the seed.

    Seeds exactly what it restores: the CPU generator and those of ``cuda_devices``
    (``torch.manual_seed`` would also re-seed every other CUDA device, for good).
    """
    devices = list(cuda_devices)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)  # fork_rng has initialised CUDA
        yield


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from OS entropy; its seed is never stored anywhere."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_os_entropy_seed())
    return generator


@dataclass
class SecretRandomness:
    """The two secret streams of one release: batch sampling (CPU) and the mechanism's noise."""

    sampling: torch.Generator
    noise: torch.Generator

    @classmethod
    def fresh(cls, device: str | torch.device = "cpu") -> SecretRandomness:
        """Independent OS-entropy seeds for sampling and noise (what a party uses)."""
        return cls(sampling=secret_generator("cpu"), noise=secret_generator(device))

    @classmethod
    def fixed(cls, seed: int, device: str | torch.device = "cpu") -> SecretRandomness:
        """Known seeds: for unit tests only, never for a release that leaves a party."""
        noise = torch.Generator(device=device)
        noise.manual_seed(seed + 1)
        return cls(sampling=torch.Generator().manual_seed(seed), noise=noise)
