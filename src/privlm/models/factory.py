"""The model factory: a run's model and tokenizer from its config, and checkpoint naming."""

from __future__ import annotations

import torch

from privlm.config import RunConfig
from privlm.models import Tokenizer
from privlm.models.tokenizer import BPETokenizer, ByteTokenizer
from privlm.models.transformer import GPT, GPTConfig


def build_model(cfg: RunConfig) -> tuple[torch.nn.Module, Tokenizer]:
    """The model (its trainable tensors are what trains and travels) and its tokenizer."""
    m = cfg.model
    if m.kind == "hf":
        from privlm.models.hf import load_lora_model

        return load_lora_model(m.path, m.lora, m.dtype, m.max_length)
    tok: Tokenizer = BPETokenizer(m.tokenizer) if m.tokenizer is not None else ByteTokenizer()
    if m.kind == "lstm":
        from privlm.models.lstm import CharLSTM, LSTMConfig

        return CharLSTM(LSTMConfig(tok.vocab_size, m.block_size, m.lstm_embed, m.lstm_hidden, m.lstm_layers)), tok
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
                          n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout))
    return model, tok


def to_checkpoint(model: torch.nn.Module, params: dict) -> dict:
    """Tensors as written to checkpoints/ (peft adapter names for LoRA models)."""
    return model.to_checkpoint(params) if hasattr(model, "to_checkpoint") else params


def from_checkpoint(model: torch.nn.Module, tensors: dict) -> dict:
    return model.from_checkpoint(tensors) if hasattr(model, "from_checkpoint") else tensors
