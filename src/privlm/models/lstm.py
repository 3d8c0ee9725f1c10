"""The character LSTM of McMahan et al. 2017 (Shakespeare): an 8-dimensional embedding, two LSTM
layers of 256 units, a linear read-out over the vocabulary. With privlm's byte vocabulary (256)
it has 866,560 parameters (the paper's 86-character vocabulary gives ~820k).

It takes the same (batch, time) token windows as :class:`~privlm.models.transformer.GPT` and returns
(batch, time, vocab) logits; ``cfg.block_size`` is the training window (the paper's 80 characters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = 256
    block_size: int = 80  # characters per training window
    embed: int = 8
    hidden: int = 256
    layers: int = 2


class CharLSTM(nn.Module):
    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed)
        self.lstm = nn.LSTM(cfg.embed, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        from privlm.models.transformer import sample

        return sample(self, idx, self.cfg.block_size, max_new_tokens, temperature, top_k, generator)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
