"""Clipping and Gaussian noise: the two operations that make a sum private.

An *update* is a mapping from parameter name to tensor. Clipping bounds the L2
norm of the whole update (all tensors together) by ``C``, so adding or removing
one client changes the sum by at most ``C`` in L2 norm. Gaussian noise of
standard deviation ``z * C`` per coordinate on that sum is the Gaussian
mechanism with noise multiplier ``z``.

Arithmetic: norms and scale factors are float64; the noise is drawn in float64 and
added in float64, and the result is rounded once to the tensors' dtype. (The DP sum
it is added to is float64 too, see :class:`privlm.federated.aggregation.RunningSum`.)
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
    """L2 norm of all tensors of ``update`` taken together, computed in float64.

    Each tensor is reduced in float64 from its exact values (float32 and bfloat16 values,
    and their squares, are exact in float64); the per-tensor norms are combined in float64.
    """
    tensors = [t.detach() for t in update.values()]
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
    return float(torch.stack(norms).norm())


# Clipping is to C * (1 - CLIP_MARGIN), so that rounding can never leave a norm above C.
CLIP_MARGIN = 1e-6


def clip_factor(norm: float, clip_norm: float) -> float:
    """The scale ``min(1, C' / norm)``, ``C' = C (1 - 1e-6)``, for an update of L2 norm ``norm``.

    Why the clipped update's norm is <= C: ``norm`` is the float64 norm of the exact values,
    off by at most n * 2^-53 relative for n coordinates (< 1e-7 for n < 1e9), and the factor
    is applied in float64 (~1e-16 relative per operation). Clipping to C' rather than C absorbs
    both. (An update of norm in (C', C] is thus scaled by at most 1 - 1e-6; it still counts as
    unclipped.)
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update with a non-finite norm")
    target = clip_norm * (1 - CLIP_MARGIN)
    return 1.0 if norm <= target else target / norm


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip_norm``, as stored.

    Returns the clipped update (new tensors of the update's dtypes; the input is not
    modified) and the norm before clipping. Each value is scaled in float64 and rounded to
    its dtype, which can grow it by about half that dtype's eps (2^-8 for bfloat16), so a
    clipped update is scaled down by one eps more.
    """
    norm = global_l2_norm(update)
    scale = clip_factor(norm, clip_norm)
    if scale < 1:
        scale *= 1 - max(torch.finfo(t.dtype).eps for t in update.values())
    return {k: (v.detach().to(torch.float64) * scale).to(v.dtype) for k, v in update.items()}, norm


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
