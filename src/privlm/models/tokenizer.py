"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary of 256).

Needs no training and no vocabulary file, handles any text, and on ASCII text
(Shakespeare, the synthetic clinic corpus) is exactly character-level, so
next-token accuracy is next-character accuracy as in McMahan et al. 2017.
"""

from __future__ import annotations

import torch


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
