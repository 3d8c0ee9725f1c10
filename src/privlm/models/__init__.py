"""Models: a small transformer trained from scratch; HF causal LMs with LoRA (models.hf)."""

from typing import Protocol

import torch

from privlm.models.tokenizer import BPETokenizer, ByteTokenizer
from privlm.models.transformer import GPT, GPTConfig


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor | list[int]) -> str: ...


__all__ = ["GPT", "GPTConfig", "ByteTokenizer", "BPETokenizer", "Tokenizer"]
