"""What any machine that trains a client needs, without the server's machinery.

The device and the per-client randomness of local training, shared by every
executor and the Flower ClientApp (which imports this, not the engine, so a node
never loads the accountant).
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch

from privlm.config import RunConfig
from privlm.errors import ConfigError
from privlm.federated.client import LocalTraining
from privlm.federated.schedule import scheduled_lr
from privlm.models.factory import build_model, from_checkpoint, to_checkpoint  # noqa: F401 (node side)
from privlm.seeds import derived_seed, seed_torch


def resolve_device(cfg: RunConfig) -> torch.device:
    """The torch device named by ``cfg.device``; an unavailable GPU is an error, not a fallback."""
    name = cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ConfigError(f"device: {name!r} is not available here ({count} CUDA device(s) visible); "
                              "use device = \"cpu\" or \"auto\"")
    return torch.device(name)


def client_generator(cfg: RunConfig, round_index: int, client_id: str) -> torch.Generator:
    """The randomness of one client's local training in a round, on whichever machine trains it.

    Returns the generator for the order of its batches, and seeds torch's global
    generator (dropout) the same way. Both depend on the client's own id, never on
    its index in the population or on the clients trained before it in this
    process: otherwise one user's presence would change another's update and the
    sensitivity C of the sum would not hold. In secure mode both are fresh OS
    randomness; in seeded (and non-private) runs they are derived from
    ``(seed, round, client id)``, so every runtime trains a client identically.
    """
    if cfg.privacy.seeded_noise or cfg.privacy.mode == "none":
        seed = derived_seed(cfg.seed, f"batches:{round_index}", client_id)
        seed_torch(derived_seed(cfg.seed, f"torch:{round_index}", client_id))
    else:
        seed = secrets.randbits(63)
        seed_torch(secrets.randbits(63))
    return torch.Generator().manual_seed(seed)


def threads_per_worker(workers: int) -> int:
    """torch threads for each of ``workers`` clients trained at once: the usable CPUs // workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // workers)


def local_training(cfg: RunConfig, round_index: int = 1) -> LocalTraining:
    """The ``[client]`` section as round ``round_index``'s local-training settings (the one place
    that reads it; the learning rate follows ``client.lr_schedule``)."""
    c = cfg.client
    lr = scheduled_lr(c.lr, c.lr_schedule, round_index, cfg.federation.rounds, c.lr_final)
    return LocalTraining(c.local_epochs, c.local_steps, c.batch_size, lr, c.optimizer)


def eval_client_indices(seed: int, num_clients: int, max_clients: int | None) -> list[int]:
    """Whose held-out text scores the model: a seeded sample of the population, sorted."""
    order = np.random.default_rng([seed, 0, 2]).permutation(num_clients)
    if max_clients is not None:
        order = order[:max_clients]
    return sorted(order.tolist())
