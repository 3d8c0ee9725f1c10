"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary of 256).

Needs no training and no vocabulary file, handles any text, and on ASCII text
(Shakespeare, the synthetic clinic corpus) is exactly character-level, so
next-token accuracy is next-character accuracy as in McMahan et al. 2017.
Also here: a byte-level BPE tokenizer (``tokenizers``) for new text
(``privlm tokenizer train``; ``model.tokenizer``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from privlm.errors import DataError


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        data = bytearray(text.encode("utf-8"))
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE tokenizer trained by ``privlm tokenizer train`` (``tokenizers``)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"{file}: not a tokenizer file ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tok.encode(text).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(ids)


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Train a byte-level BPE tokenizer on ``texts``; write ``out/tokenizer.json``.

    Train it on public text: a vocabulary learned from private text reveals
    its frequent strings (and is not covered by the DP guarantee).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"
