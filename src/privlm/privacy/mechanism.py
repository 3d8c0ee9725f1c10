"""Clipping and Gaussian noise: the two operations that make a sum private.

An *update* is a mapping from parameter name to tensor. Clipping bounds the L2
norm of the whole update (all tensors together) by ``C``, so adding or removing
one client changes the sum by at most ``C`` in L2 norm. Gaussian noise of
standard deviation ``z * C`` per coordinate on that sum is the Gaussian
mechanism with noise multiplier ``z``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping

import torch

Update = Mapping[str, torch.Tensor]


def global_l2_norm(update: Update) -> float:
    """L2 norm of all tensors of ``update`` taken together (computed in float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for t in update.values():
        total += t.detach().to(torch.float64).pow(2).sum()
    return float(total.sqrt())


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale ``update`` so its global L2 norm is at most ``clip_norm``.

    Returns the clipped update (new tensors; the input is not modified) and the
    norm before clipping. Scale factor ``min(1, C / norm)``; computed in float64
    and applied in the tensors' dtype, with a final guard so rounding can never
    leave the clipped norm above ``C``.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_l2_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped = {k: v.detach() * scale for k, v in update.items()}
    if scale < 1.0:
        # Float rounding of the scaled tensors may overshoot C by ~1 ulp; shave it off.
        clipped_norm = global_l2_norm(clipped)
        if clipped_norm > clip_norm:
            shave = clip_norm / clipped_norm * (1 - 1e-6)
            clipped = {k: v * shave for k, v in clipped.items()}
    return clipped, norm


class NoiseSource:
    """Hands out one ``torch.Generator`` per round for the noise draw.

    Secure (the default): each generator is seeded with 63 fresh bits from the
    operating system's CSPRNG (``secrets``), so the noise of a round cannot be
    predicted from anything the run stores. Seeded (tests only): the seed of
    round ``r`` is derived from ``(seed, r)``, which makes runs reproducible,
    including across a resume.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    @property
    def secure(self) -> bool:
        return self.seed is None

    def generator(self, round_index: int, stream: str = "noise") -> torch.Generator:
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.manual_seed(secrets.randbits(63))
        else:
            digest = hashlib.sha256(f"{self.seed}:{stream}:{round_index}".encode()).digest()
            g.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return g


def add_gaussian_noise(
    total: Update, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Return ``total + N(0, std^2 I)``: one independent draw per coordinate.

    Noise is drawn in float32 on the CPU in a fixed order of parameter names,
    so a seeded generator gives the same noise on every machine.
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    noised = {}
    for name in sorted(total):
        t = total[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        noised[name] = t + (noise * std).to(t.dtype)
    return noised
