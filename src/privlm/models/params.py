"""A model's trainable tensors by name: what trains, travels and is saved."""

from __future__ import annotations

import torch
from torch import nn

Params = dict[str, torch.Tensor]


def get_params(model: nn.Module) -> Params:
    """Detached CPU copies of the trainable parameters, by name (shared weights once).

    The server's state always lives in host memory, whatever device trains: clipping,
    noise and the ledger never depend on where a client's arithmetic ran.
    """
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def set_params(model: nn.Module, params: Params) -> None:
    for n, p in model.named_parameters():
        if n in params:
            p.copy_(params[n])


def block_size(model: nn.Module) -> int:
    """The longest window the model takes (``model.cfg.block_size``: privlm's GPT and HF wrappers)."""
    return int(model.cfg.block_size)  # type: ignore[union-attr]
