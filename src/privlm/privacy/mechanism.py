"""Clipping and Gaussian noise: the two operations that make a sum private.

An *update* is a mapping from parameter name to tensor. Clipping bounds the L2
norm of the whole update (all tensors together) by ``C``, so adding or removing
one client changes the sum by at most ``C`` in L2 norm. Gaussian noise of
standard deviation ``z * C`` per coordinate on that sum is the Gaussian
mechanism with noise multiplier ``z``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping

import numpy as np
import torch

Update = Mapping[str, torch.Tensor]


def global_l2_norm(update: Update) -> float:
    """L2 norm of all tensors of ``update`` taken together.

    Per-tensor norms in the tensors' dtype (one fused kernel), combined in float64.
    """
    tensors = [t.detach() for t in update.values()]
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.stack(norms).to(torch.float64).norm())


def clip_factor(norm: float, clip_norm: float) -> float:
    """The scale ``min(1, C / norm)`` that clipping applies to an update of L2 norm ``norm``.

    Above the bound the factor carries a relative margin of 1e-6, so that float32
    rounding in computing the norm or applying the factor can never leave the
    clipped update's norm above ``C``.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with a non-finite norm")
    return 1.0 if norm <= clip_norm else clip_norm / norm * (1 - 1e-6)


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip_norm``.

    Returns the clipped update (new tensors; the input is not modified) and the
    norm before clipping.
    """
    norm = global_l2_norm(update)
    scale = clip_factor(norm, clip_norm)
    return {k: v.detach() * scale for k, v in update.items()}, norm


class NoiseSource:
    """Hands out one random generator per round for the noise draw.

    Secure (the default): each round's generator is NumPy's Philox counter-based
    generator keyed with 128 fresh bits from the operating system's CSPRNG
    (``secrets``), so the noise of a round cannot be predicted or enumerated
    from anything the run stores. (``torch.Generator`` is not used for noise: its
    CPU generator keeps only 32 bits of a seed, which an attacker could search.)
    Seeded (tests only): the key of round ``r`` is derived from ``(seed, r)``,
    which makes runs reproducible, including across a resume.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    @property
    def secure(self) -> bool:
        return self.seed is None

    def generator(self, round_index: int, stream: str = "noise") -> np.random.Generator:
        if self.seed is None:
            key = secrets.randbits(128)
        else:
            digest = hashlib.sha256(f"{self.seed}:{stream}:{round_index}".encode()).digest()
            key = int.from_bytes(digest[:16], "little")
        return np.random.Generator(np.random.Philox(key=key))


def add_gaussian_noise(
    total: Update, std: float, generator: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Return ``total + N(0, std^2 I)``: one independent draw per coordinate.

    Noise is drawn in float64 and added in float64 before rounding to the
    tensors' dtype, in a fixed order of parameter names, so a seeded generator
    gives the same noise on every machine.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    noised = {}
    for name in sorted(total):
        t = total[name]
        noise = torch.from_numpy(generator.standard_normal(tuple(t.shape)))
        noised[name] = (t.to(torch.float64) + noise * std).to(t.dtype)
    return noised
