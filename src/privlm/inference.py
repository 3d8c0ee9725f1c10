"""Load a run directory's model for evaluation and generation."""

from __future__ import annotations

from pathlib import Path

import torch

from privlm.config import load_config
from privlm.data import ClientData, FederatedCorpus, corpus_of
from privlm.data.scrub import scrub_corpus, settings_for_run
from privlm.errors import DataError
from privlm.federated.client import evaluate, get_params, set_params
from privlm.models import Tokenizer
from privlm.rundir import open_run_dir


def load_run_model(run_dir: Path) -> tuple[int, torch.nn.Module, Tokenizer, object]:
    """(round, model with the latest checkpoint loaded, tokenizer, config) of a run."""
    rd = open_run_dir(run_dir)
    cfg = load_config(rd.config_path)
    from privlm.models.factory import build_model, from_checkpoint

    model, tok = build_model(cfg)
    r, tensors = rd.latest_checkpoint()
    try:
        params = from_checkpoint(model, tensors)
    except (ValueError, RuntimeError) as e:
        raise DataError(f"{rd.checkpoint_path(r)}: {e}") from None
    expected = get_params(model)
    if set(params) != set(expected) or any(params[k].shape != expected[k].shape for k in params):
        raise DataError(f"{rd.checkpoint_path(r)}: tensors do not match the model in config.toml")
    for name, t in params.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(f"{rd.checkpoint_path(r)}: tensor {name!r} holds NaN or Inf; this model cannot be "
                            "evaluated or sampled from")
    set_params(model, params)
    model.eval()
    return r, model, tok, cfg


def evaluate_run(run_dir: Path) -> tuple[int, float, float, int]:
    r, model, tok, cfg = load_run_model(run_dir)
    corpus = corpus_of(cfg)
    settings = settings_for_run(cfg)
    if settings is not None:  # the held-out text as the run's clients saw it: scrubbed
        held_out = FederatedCorpus(corpus.name, tuple(ClientData(c.client_id, "", c.test) for c in corpus.clients))
        corpus, _ = scrub_corpus(held_out, settings, progress=False)
    tokens = [t for c in corpus.clients if (t := tok.encode(c.test)).numel() > 1]
    params = get_params(model)
    loss, acc, n = evaluate(model, params, tokens, cfg.eval.batch_size)
    return r, loss, acc, n


def generate_text(run_dir: Path, prompt: str, max_new_tokens: int = 200,
                  temperature: float = 0.8, seed: int | None = None) -> str:
    _, model, tok, _ = load_run_model(run_dir)
    ids = tok.encode(prompt or "\n").unsqueeze(0)
    if ids.numel() == 0:
        ids = tok.encode("\n").unsqueeze(0)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(ids, max_new_tokens, temperature=temperature, generator=g)
    return prompt + tok.decode(out[0, ids.size(1):])
