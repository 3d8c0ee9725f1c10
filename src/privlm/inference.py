"""Load a run directory's model for evaluation and generation."""

from __future__ import annotations

from pathlib import Path

import torch

from privlm.config import load_config
from privlm.data import load_corpus
from privlm.errors import DataError
from privlm.federated.client import evaluate, set_params
from privlm.models import GPT, ByteTokenizer
from privlm.rundir import open_run_dir


def load_run_model(run_dir: Path) -> tuple[int, GPT, object]:
    rd = open_run_dir(run_dir)
    cfg = load_config(rd.config_path)
    from privlm.runtime.simulation import build_model

    model = build_model(cfg)
    r, params = rd.latest_checkpoint()
    expected = dict(model.named_parameters())
    if set(params) != set(expected) or any(params[k].shape != expected[k].shape for k in params):
        raise DataError(f"{rd.checkpoint_path(r)}: tensors do not match the model in config.toml")
    set_params(model, params)
    model.eval()
    return r, model, cfg


def evaluate_run(run_dir: Path) -> tuple[int, float, float, int]:
    r, model, cfg = load_run_model(run_dir)
    corpus = load_corpus(cfg.data.source, cfg.data.path, cfg.data.num_clients, cfg.seed)
    tok = ByteTokenizer()
    tokens = [t for c in corpus.clients if (t := tok.encode(c.test)).numel() > 1]
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss, acc, n = evaluate(model, params, tokens, cfg.eval.batch_size)
    return r, loss, acc, n


def generate_text(run_dir: Path, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, seed: int | None = None) -> str:
    _, model, _ = load_run_model(run_dir)
    tok = ByteTokenizer()
    ids = tok.encode(prompt or "\n").unsqueeze(0)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(ids, max_new_tokens, temperature=temperature, generator=g)
    return prompt + tok.decode(out[0, ids.size(1):])
