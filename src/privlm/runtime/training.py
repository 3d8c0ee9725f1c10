"""What any machine that trains a client needs, without the server's machinery.

Model construction and the per-client randomness of local training, shared by
the in-process simulation and the Flower ClientApp (which imports this, not the
simulation, so a node never loads the accountant).
"""

from __future__ import annotations

import hashlib
import os
import secrets

import torch

from privlm.config import RunConfig
from privlm.errors import ConfigError
from privlm.models import GPT, BPETokenizer, ByteTokenizer, GPTConfig, Tokenizer


def build_model(cfg: RunConfig) -> tuple[torch.nn.Module, Tokenizer]:
    """The model (its trainable tensors are what trains and travels) and its tokenizer."""
    m = cfg.model
    if m.kind == "hf":
        from privlm.models.hf import load_lora_model

        return load_lora_model(m.path, m.lora, m.dtype, m.max_length)
    tok: Tokenizer = BPETokenizer(m.tokenizer) if m.tokenizer is not None else ByteTokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                          n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout))
    return model, tok


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


def to_checkpoint(model: torch.nn.Module, params: dict) -> dict:
    """Tensors as written to checkpoints/ (peft adapter names for LoRA models)."""
    return model.to_checkpoint(params) if hasattr(model, "to_checkpoint") else params


def from_checkpoint(model: torch.nn.Module, tensors: dict) -> dict:
    return model.from_checkpoint(tensors) if hasattr(model, "from_checkpoint") else tensors


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


def derived_seed(seed: int, stream: str, key: object) -> int:
    """A 63-bit seed from (seed, stream, key): for seeded runs only, never for secure noise."""
    digest = hashlib.sha256(f"{seed}:{stream}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
