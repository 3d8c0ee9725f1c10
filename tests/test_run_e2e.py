"""End-to-end runs on tiny Shakespeare with tiny models: the run directory contract,
learning with and without DP, the exact budget stop, and the noise scale in a real run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from privlm.config import load_config
from privlm.data import load_corpus
from privlm.privacy import Ledger, epsilon, epsilon_for
from privlm.api import Simulation

TINY = [
    "data.source=tinyshakespeare",
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
    "client.batch_size=8", "client.optimizer=adam", "client.lr=0.01",
    "eval.max_clients=40", "output.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def tiny_corpus(shared_data):
    return load_corpus("tinyshakespeare", shared_data / "tinyshakespeare.txt", 0, 0)


def _cfg(shared_data, *extra):
    return load_config(None, [*TINY, f'data.path="{shared_data / "tinyshakespeare.txt"}"', *extra])


UNIFORM = math.log(256)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "user"])
def test_private_and_nonprivate_runs_learn(shared_data, tiny_corpus, tmp_path, mode):
    cfg = _cfg(shared_data, f"privacy.mode={mode}", "federation.rounds=8",
               "federation.clients_per_round=60", "client.local_steps=8",
               "privacy.target_epsilon=10", "privacy.clip_norm=1.0")
    res = Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 8
    # Well below the uniform baseline ln 256 = 5.55 nats (a unigram model is ~3.3).
    assert res.eval_loss < 0.65 * UNIFORM, res.metrics
    assert res.metrics[-1]["eval_loss"] < res.metrics[0]["eval_loss"]
    if mode == "user":
        assert 0 < res.epsilon <= 10
    else:
        assert res.epsilon is None


def test_run_directory_contract(shared_data, tiny_corpus, tmp_path):
    cfg = _cfg(shared_data, "federation.rounds=3", "federation.clients_per_round=20",
               "client.local_steps=1", "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true")
    res = Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    rd = res.run_dir
    resolved = load_config(rd / "config.toml")
    assert resolved.privacy.noise_multiplier == 1.0 and resolved.privacy.delta == pytest.approx(245**-1.1)
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "train_loss", "eval_loss", "eval_accuracy", "epsilon", "clients", "seconds"} <= set(r)
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == [
        "round-0000.safetensors", "round-0002.safetensors", "round-0003.safetensors"]
    ckpt = load_file(rd / "checkpoints" / "round-0003.safetensors")
    assert set(ckpt) == {n for n, _ in Simulation(cfg, tiny_corpus).model.named_parameters()}
    priv = json.loads((rd / "privacy.json").read_text())
    for key in ("mode", "unit", "epsilon", "delta", "accountant", "noise_multiplier", "clip_norm",
                "sampling_rate", "num_clients", "rounds_completed", "ledger"):
        assert key in priv
    assert priv["unit"] == "user" and priv["rounds_completed"] == 3 and len(priv["ledger"]) == 3
    q = 20 / 245
    assert priv["epsilon"] == pytest.approx(epsilon(q, 1.0, 3, 245**-1.1))
    assert priv["epsilon"] == epsilon_for(Ledger.from_list(priv["ledger"]), priv["delta"])
    assert rows[-1]["epsilon"] == pytest.approx(priv["epsilon"])
    assert "WARNING" in priv["guarantee"]  # seeded noise is announced
    html = (rd / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "differential privacy" in html


def test_budget_stop_triggers_exactly_at_the_right_round(shared_data, tiny_corpus, tmp_path):
    q, z, d = 30 / 245, 0.9, 245**-1.1
    eps = [epsilon(q, z, t, d) for t in range(1, 11)]
    budget = (eps[4] + eps[5]) / 2  # 5 rounds fit, the 6th would exceed
    cfg = _cfg(shared_data, "federation.rounds=10", "federation.clients_per_round=30",
               "client.local_steps=1", f"privacy.noise_multiplier={z}", f"privacy.max_epsilon={budget}")
    res = Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 5 and "round 6" in res.stopped
    priv = json.loads((res.run_dir / "privacy.json").read_text())
    assert len(priv["ledger"]) == 5 and priv["epsilon"] == pytest.approx(eps[4]) and priv["epsilon"] <= budget
    assert (res.run_dir / "checkpoints" / "round-0005.safetensors").exists()


def test_calibrated_run_meets_target_exactly(shared_data, tiny_corpus, tmp_path):
    cfg = _cfg(shared_data, "federation.rounds=4", "federation.clients_per_round=25",
               "client.local_steps=1", "privacy.target_epsilon=3.0")
    res = Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 4 and res.stopped is None
    assert 2.99 < res.epsilon <= 3.0


def test_zero_local_updates_give_pure_noise_of_the_claimed_scale(shared_data, tiny_corpus, tmp_path):
    """local lr = 0: one round changes the params by N(0, (zC/(qN))^2) per coordinate."""
    z, C, m = 2.0, 0.5, 40
    cfg = _cfg(shared_data, "federation.rounds=1", f"federation.clients_per_round={m}",
               "client.local_steps=1", "client.lr=0", "model.n_embd=64", "model.n_layer=2",
               f"privacy.noise_multiplier={z}", f"privacy.clip_norm={C}", "privacy.target_epsilon=1000")
    res = Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    before = load_file(res.run_dir / "checkpoints" / "round-0000.safetensors")
    after = load_file(res.run_dir / "checkpoints" / "round-0001.safetensors")
    diff = torch.cat([(after[k] - before[k]).flatten() for k in before])
    expected = z * C / m  # q*N = m
    assert diff.numel() > 50_000
    assert abs(float(diff.std()) / expected - 1) < 0.02
    assert abs(float(diff.mean())) < 5 * expected / math.sqrt(diff.numel())


def test_seeded_runs_are_reproducible(shared_data, tiny_corpus, tmp_path):
    cfg = _cfg(shared_data, "federation.rounds=2", "federation.clients_per_round=20",
               "client.local_steps=2", "privacy.noise_multiplier=1.0", "privacy.seeded_noise=true")
    a = Simulation(cfg, tiny_corpus).run(tmp_path / "a", progress=False)
    b = Simulation(cfg, tiny_corpus).run(tmp_path / "b", progress=False)
    pa = load_file(a.run_dir / "checkpoints" / "round-0002.safetensors")
    pb = load_file(b.run_dir / "checkpoints" / "round-0002.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_secure_noise_runs_differ(shared_data, tiny_corpus, tmp_path):
    cfg = _cfg(shared_data, "federation.rounds=1", "federation.clients_per_round=20",
               "client.local_steps=1", "privacy.noise_multiplier=1.0")
    a = Simulation(cfg, tiny_corpus).run(tmp_path / "a", progress=False)
    b = Simulation(cfg, tiny_corpus).run(tmp_path / "b", progress=False)
    pa = load_file(a.run_dir / "checkpoints" / "round-0001.safetensors")
    pb = load_file(b.run_dir / "checkpoints" / "round-0001.safetensors")
    assert not torch.equal(pa["head.weight"], pb["head.weight"])


def test_refuses_to_overwrite_a_run(shared_data, tiny_corpus, tmp_path):
    from privlm.errors import DataError

    cfg = _cfg(shared_data, "federation.rounds=1", "federation.clients_per_round=10",
               "client.local_steps=1", "privacy.mode=none")
    Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="already holds a run"):
        Simulation(cfg, tiny_corpus).run(tmp_path / "run", progress=False)


def test_ledger_entry_is_on_disk_before_the_parameters_it_pays_for(shared_data, tiny_corpus, tmp_path,
                                                                   monkeypatch):
    """Whenever a checkpoint of round r is written, privacy.json on disk already holds r entries,
    and the ledger entry of round r is on disk before round r's clients are even sampled."""
    from privlm.mechanisms.gaussian import GaussianFedAvg
    from privlm.rundir import RunDir

    out = tmp_path / "run"
    seen = []
    real_save, real_sample = RunDir.save_checkpoint, GaussianFedAvg.sample

    def ledger_on_disk() -> int:
        return len(json.loads((out / "privacy.json").read_text())["ledger"])

    def save(self, r, params):
        seen.append(("checkpoint", r, ledger_on_disk() if r else 0))
        return real_save(self, r, params)

    def sample(self, rng, round_index=1):
        seen.append(("sample", None, ledger_on_disk()))
        return real_sample(self, rng, round_index)

    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    monkeypatch.setattr(GaussianFedAvg, "sample", sample)
    cfg = _cfg(shared_data, "federation.rounds=3", "federation.clients_per_round=10",
               "client.local_steps=1", "privacy.noise_multiplier=1.0", "output.checkpoint_every=1")
    Simulation(cfg, tiny_corpus).run(out, progress=False)
    samples = [n for kind, _, n in seen if kind == "sample"]
    assert samples == [1, 2, 3]  # round r's entry is durable before round r samples
    for kind, r, n in seen:
        if kind == "checkpoint" and r:
            assert n >= r
