"""Seeds for seeded (test) runs and torch's global generator: shared by the engine and every
machine that trains a client. Never used for secure noise (``privlm.privacy.mechanism``)."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, stream: str, key: object) -> int:
    """A 63-bit seed from (seed, stream, key): for seeded runs only, never for secure noise."""
    digest = hashlib.sha256(f"{seed}:{stream}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_torch(seed: int) -> None:
    """``torch.manual_seed``, without its cost on a machine with no CUDA.

    ``torch.manual_seed`` also queues a lazy seed for each accelerator type
    (CUDA, XPU, MTIA) that is not initialised, formatting a Python stack trace
    for every one of them: about 1 ms, paid per client per round. Where CUDA is
    available the full call runs (it seeds the GPUs a client trains on); where it
    is not, torch's CPU generator is the only one training can draw from.
    """
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
