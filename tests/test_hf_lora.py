"""Hugging Face causal LMs with LoRA under user-level DP: only adapters train, travel and are saved.

Tiny GPT-2 and Llama models with random weights are built from a config and saved,
with a tokenizer trained here, to a temp directory (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlm.config import load_config
from privlm.data.clinic import example_text
from privlm.errors import ConfigError
from privlm.federated.client import LocalTraining, get_params, local_train
from privlm.models.hf import resolve_model_path
from privlm.models.tokenizer import train_bpe
from privlm.privacy.mechanism import clip_update, global_l2_norm
from privlm.api import Simulation
from privlm.runtime.training import threads_per_worker

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_bpe([example_text(seed=s) for s in range(30)], 400, out)
    return out


def _tiny(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.heavy)])  # (llama: CI time)
def tiny_model(request, tmp_path_factory, tokenizer_dir) -> Path:
    return _tiny(request.param, tokenizer_dir, tmp_path_factory.mktemp(request.param))


def _cfg(model_dir: Path, *extra: str):
    return load_config(None, [
        "model.kind=hf", f'model.path="{model_dir}"', "model.max_length=32",
        "data.num_clients=40", "federation.rounds=2", "federation.clients_per_round=8",
        "client.local_steps=2", "client.batch_size=4", "client.lr=0.01",
        "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5", "privacy.target_epsilon=100",
        "eval.max_clients=5", "output.checkpoint_every=1", *extra])


def test_dp_rounds_train_only_the_adapters(tiny_model, tmp_path):
    sim = Simulation(_cfg(tiny_model))
    base_before = {n: p.detach().clone() for n, p in sim.model.named_parameters() if not p.requires_grad}
    trainable = get_params(sim.model)
    assert trainable and all("lora_" in n for n in trainable)
    res = sim.run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 2 and res.epsilon is not None
    # Base weights: bitwise unchanged, also against the files on disk.
    for n, p in sim.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    fresh_params = dict(fresh.named_parameters())
    for n, p in sim.model.named_parameters():
        if not p.requires_grad:
            key = n.removeprefix("peft.base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, fresh_params[key]), n
    # Checkpoints hold the adapters only, under peft's names, and they changed.
    c0 = load_file(res.run_dir / "checkpoints" / "round-0000.safetensors")
    c2 = load_file(res.run_dir / "checkpoints" / "round-0002.safetensors")
    assert set(c0) == set(c2) and all("lora_" in k and ".default" not in k for k in c0)
    assert len(c0) == len(trainable)
    assert any(not torch.equal(c0[k], c2[k]) for k in c0)
    assert json.loads((res.run_dir / "checkpoints" / "adapter_config.json").read_text())["r"] == 8


def test_the_clip_applies_to_the_adapter_update(tiny_model):
    sim = Simulation(_cfg(tiny_model, "client.lr=0.5", "client.local_steps=4"))
    params = get_params(sim.model)
    res = local_train(sim.model, params, sim.train_tokens[0], LocalTraining(steps=4, batch_size=4, lr=0.5,
                      optimizer="adam"), torch.Generator().manual_seed(0))
    assert set(res.update) == set(params)  # what a client sends: exactly the adapter tensors
    norm = global_l2_norm(res.update)
    assert norm > 0.5
    clipped, _ = clip_update(res.update, 0.5)
    assert global_l2_norm(clipped) == pytest.approx(0.5, rel=1e-5)
    sent = sum(t.numel() * t.element_size() for t in res.update.values())
    full = sum(p.numel() * p.element_size() for p in sim.model.parameters())
    assert sent == sum(p.numel() * p.element_size() for p in sim.model.parameters() if p.requires_grad)
    assert sent / full < 0.5


def test_eval_and_generate_load_base_plus_adapter(tiny_model, tmp_path):
    from privlm.inference import evaluate_run, generate_text

    res = Simulation(_cfg(tiny_model, "federation.rounds=1")).run(tmp_path / "run", progress=False)
    r, loss, acc, n = evaluate_run(res.run_dir)
    assert r == 1 and n > 0 and 0 <= acc <= 1
    assert loss == pytest.approx(res.eval_loss, rel=0.2)  # all clients vs the per-round subset
    text = generate_text(res.run_dir, "Patient", max_new_tokens=5, seed=1)
    assert text.startswith("Patient")


def test_resolve_model_path(tmp_path, tiny_model, monkeypatch):
    assert resolve_model_path(str(tiny_model)) == (tiny_model, None)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model_path(str(g)) == (tmp_path, "m.gguf")
    pkg = tmp_path / "site" / "fake_llm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "weights.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_model_path("fake-llm-pkg") == (pkg, "weights.Q4.gguf")
    with pytest.raises(ConfigError, match="model.path: nowhere-xyz is not a model directory"):
        resolve_model_path("nowhere-xyz")
    assert resolve_model_path("SomeOrg/some-model") == (Path("SomeOrg/some-model"), None)  # a hub id
    with pytest.raises(ConfigError, match="model.path: cannot load a causal LM from .*m.gguf"):
        Simulation(_cfg(g))  # not really a GGUF
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.path: cannot load"):
        Simulation(_cfg(tmp_path / "empty"))  # a directory without a model


def test_hf_needs_a_path():
    with pytest.raises(ConfigError, match="model: .*needs model.path"):
        load_config(None, ["model.kind=hf"])


def test_from_scratch_transformer_with_a_trained_bpe_tokenizer(tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from privlm.cli import app

    (tmp_path / "public.txt").write_text("\n".join(example_text(seed=s) for s in range(20)))
    res = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(tmp_path / "public.txt"),
                                   "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    assert res.exit_code == 0, res.output
    cfg = load_config(None, [f'model.tokenizer="{tmp_path / "tok"}"', "data.num_clients=30",
                             "federation.rounds=1", "federation.clients_per_round=5",
                             "privacy.mode=none", "eval.max_clients=5", "model.n_embd=16"])
    sim = Simulation(cfg)
    assert sim.model.cfg.vocab_size == 300 and sim.tokenizer.vocab_size == 300
    text = sim.corpus.clients[0].train[:200]
    assert sim.tokenizer.decode(sim.tokenizer.encode(text)) == text
    assert sim.train_tokens[0].numel() < len(sim.corpus.clients[0].train)  # merges compress
    res = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(tmp_path / "none"),
                                   "--vocab-size", "300", "--out", str(tmp_path / "t2")])
    assert res.exit_code == 2 and "--data" in res.output


def test_example_level_dp_sgd_with_a_lora_model(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, "privacy.mode=example", "data.silos=2", "federation.clients_per_round=2",
               "federation.rounds=1", "privacy.target_epsilon=5", "privacy.noise_multiplier=1.0",
               "privacy.example.sampling_rate=0.1", "privacy.example.max_records=100000")
    sim = Simulation(cfg)
    base_before = {n: p.detach().clone() for n, p in sim.model.named_parameters() if not p.requires_grad}
    res = sim.run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 1 and 0 < res.epsilon <= 5
    for n, p in sim.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    c0 = load_file(res.run_dir / "checkpoints" / "round-0000.safetensors")
    c1 = load_file(res.run_dir / "checkpoints" / "round-0001.safetensors")
    assert any(not torch.equal(c0[k], c1[k]) for k in c0)


def test_the_audit_runs_on_a_lora_run(tiny_model, tmp_path):
    from privlm.audit import run_audit

    cfg = _cfg(tiny_model, "audit.canaries=10", "audit.update_canaries=20", "audit.holdout_fraction=0.2")
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    a = run_audit(res.run_dir, references=50, generations=2, guesses=10, seed=0)
    assert a["canaries"]["count"] == 10 and len(a["canaries"]["per_canary"]) == 10
    assert a["update_canaries"]["count"] == 20 and a["update_canaries"]["one_run"]["guesses"] == 10
    assert a["membership"]["nonmembers"] == 8 and 0 <= a["membership"]["auc"] <= 1
    assert a["pii"]["generations"] == 2
    assert (res.run_dir / "audit.json").exists()


def test_parallel_clients_train_lora_as_one_at_a_time(tiny_model, tmp_path, caplog):
    """``workers = 2`` deep-copies the peft model per thread; without dropout the run equals
    workers = 1 to the bit. With dropout (tiny GPT-2 has p = 0.1) masks depend on thread
    timing: the run says so, and a resume treats its rounds as not replayable. Worker
    processes load the model themselves and seed per client: equal to the bit either way."""
    threads = torch.get_num_threads()
    sims = {}
    try:
        for w in (1, 2, "p"):
            # the same kernels each time: cpus // 2 threads, what 2 threads or 2 processes get
            torch.set_num_threads(threads_per_worker(2))
            extra = ["workers=2", "worker_kind=process"] if w == "p" else [f"workers={w}"]
            sims[w] = Simulation(_cfg(tiny_model, "privacy.seeded_noise=true", "client.optimizer=sgd", *extra))
            sims[w].run(tmp_path / str(w), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert sims["p"].replayable
    p = load_file(str(tmp_path / "p" / "checkpoints" / "round-0002.safetensors"))
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in sims[1].model.modules())
    assert dropout is (tiny_model.name.startswith("gpt2"))  # GPT-2's default p = 0.1; LLaMA's 0
    assert sims[1].replayable and sims[2].replayable is not dropout
    assert ("not bit-reproducible" in caplog.text) is dropout
    a = load_file(str(tmp_path / "1" / "checkpoints" / "round-0002.safetensors"))
    b = load_file(str(tmp_path / "2" / "checkpoints" / "round-0002.safetensors"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    if not dropout:
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() == p.keys() and all(torch.equal(a[k], p[k]) for k in a)
