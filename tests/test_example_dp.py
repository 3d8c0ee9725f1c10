"""Example-level DP-SGD inside each silo (Opacus): per-record clipping, per-silo accounting,
per-silo budget stop, and the run directory of a few-silo federation."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from privlm.cli import app
from privlm.config import load_config
from privlm.federated.client import LocalTraining, get_params
from privlm.federated.dp_sgd import (
    ExampleDP,
    clipped_sum_of_record_grads,
    dp_sgd_train,
    per_record_loss,
    record_windows,
)
from privlm.models import GPT, GPTConfig
from privlm.privacy.accountant import PLD_DISCRETIZATION
from privlm.privacy.mechanism import clip_update
from privlm.errors import ConfigError
from privlm.api import Simulation

BASE = ["privacy.mode=example", "data.num_clients=40", "data.silos=4", "federation.rounds=3",
        "federation.clients_per_round=4", "client.local_steps=3", "client.batch_size=8",
        "model.n_embd=16", "model.n_layer=1", "model.n_head=2", "model.block_size=32",
        "privacy.clip_norm=1.0", "eval.max_clients=4", "privacy.seeded_noise=true",
        "privacy.example.sampling_rate=0.05", "privacy.example.max_records=2000"]


def _explicit_clipped_sum(model, x, y, clip_norm):
    """Per record: its own gradient, clipped over all tensors together; then summed."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(x.size(0)):
        model.zero_grad()
        per_record_loss(model, x[i : i + 1], y[i : i + 1]).backward()
        g, _ = clip_update({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, clip_norm)
        for n in total:
            total[n] += g[n]
    return total


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_opacus_clipped_sum_equals_an_explicit_per_record_loop(mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_embd=16, n_head=2))
    records = [torch.randint(0, 256, (n,)) for n in (5, 17, 30, 2, 9, 12)]
    x, y, truncated = record_windows(records, 16)
    assert truncated == 1 and x.shape == (6, 16)  # 17 tokens = 16 pairs fit; 30 do not
    for clip in (1e-3, 0.3, 1e3):  # all clipped / some / none
        got = clipped_sum_of_record_grads(model, x, y, clip, mode)
        want = _explicit_clipped_sum(model, x, y, clip)
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), (mode, clip, n)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())  # hooks removed


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_lora_model_per_record_grads(mode):
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    from privlm.models.hf import LoRACausalLM

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no dropout: batch and per-record passes agree
    model = LoRACausalLM(get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")), 16)
    x, y, _ = record_windows([torch.randint(0, 300, (n,)) for n in (7, 20, 11)], 16)
    got = clipped_sum_of_record_grads(model, x, y, 0.05, mode)
    want = _explicit_clipped_sum(model, x, y, 0.05)
    assert set(got) == set(want) and all("lora_" in n for n in got)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-7, rtol=1e-4), n


def test_empty_poisson_batches_are_noise_only_steps():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_embd=8, n_head=2))
    x, y, _ = record_windows([torch.randint(0, 256, (6,)) for _ in range(3)], 8)
    params = get_params(model)
    dp = ExampleDP(sampling_rate=1e-9, noise_multiplier=1.0, clip_norm=1.0)  # never samples anyone
    res, steps = dp_sgd_train(model, params, x, y, LocalTraining(steps=4, batch_size=1, lr=0.1, optimizer="sgd"), dp,
                              np.random.default_rng(0), np.random.default_rng(1))
    assert steps == 4
    flat = torch.cat([u.flatten() for u in res.update.values()])
    # 4 SGD steps of lr 0.1 on pure noise N(0, C^2) / batch size (1): std 0.1 * sqrt(4) = 0.2
    assert flat.std().item() == pytest.approx(0.2, rel=0.05)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_a_clipped_records_gradient_never_exceeds_c(mode):
    """Issue #18.5 in example mode: clip C set just below each record's own gradient norm."""
    from privlm.federated.dp_sgd import ExampleDP, _dp_optimizer, _clipped_backward, _per_sample_grads
    from privlm.federated.client import make_optimizer

    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_embd=16, n_head=2))
    with torch.no_grad():  # large gradients (norms ~200): Opacus's C / (norm + 1e-6) in float32 exceeded C
        for p in model.parameters():
            p.mul_(10)
    x, y, _ = record_windows([torch.randint(0, 256, (n,)) for n in (9, 14, 17, 6, 12, 15)], 16)
    worst = 0.0
    for i in range(x.size(0)):
        full = clipped_sum_of_record_grads(model, x[i:i + 1], y[i:i + 1], 1e9, mode)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in full.values())))
        for rel in (1e-9, 1e-8, 1e-7, 3e-7, 1e-6, 1e-5):
            clip = norm * (1 - rel)
            with _per_sample_grads(model, mode, clip) as gsm:
                opt = _dp_optimizer(make_optimizer(model, LocalTraining(lr=0.0, optimizer="sgd")),
                                    ExampleDP(1.0, 0.0, clip, mode), 1, np.random.default_rng(0))
                opt.zero_grad(set_to_none=True)
                _clipped_backward(gsm, opt, x[i:i + 1], y[i:i + 1], mode)
                opt.clip_and_accumulate()
                got = float(torch.sqrt(sum((p.summed_grad.double() ** 2).sum() for p in opt.params)))
            worst = max(worst, got / clip)
    assert worst <= 1.0, worst


def _direct_epsilon(q, z, steps, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return acc.get_epsilon(delta)


def test_each_silo_epsilon_equals_a_direct_dp_accounting_computation(tmp_path):
    cfg = load_config(None, [*BASE, "privacy.target_epsilon=3"])
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    priv = json.loads((res.run_dir / "privacy.json").read_text())
    assert priv["unit"] == "record" and len(priv["silos"]) == 4 and res.rounds_completed == 3
    for s in priv["silos"]:
        direct = _direct_epsilon(s["sampling_rate"], s["noise_multiplier"], 3 * s["steps_per_round"],
                                 priv["delta"])
        assert s["epsilon"] == pytest.approx(direct, rel=1e-9)
        assert s["epsilon"] <= 3.0 and s["epsilon"] > 2.9  # calibrated to the target
        assert f"Silo {s['silo']}: epsilon" in priv["guarantee"]
    assert priv["epsilon"] == max(s["epsilon"] for s in priv["silos"])
    # `privlm epsilon --ledger` reproduces every silo's epsilon from the ledger alone.
    out = CliRunner().invoke(app, ["epsilon", "--ledger", str(res.run_dir)])
    assert out.exit_code == 0, out.output
    lines = dict(line.split() for line in out.output.strip().splitlines()[:-1])
    for s in priv["silos"]:
        assert float(lines[s["silo"]]) == pytest.approx(s["epsilon"], rel=1e-5)
    assert res.eval_loss < np.log(256)


def test_silos_over_the_budget_stop_contributing(tmp_path):
    # Every silo runs the same public mechanism; the budget is what 2 of the 3 rounds cost.
    probe = Simulation(load_config(None, [*BASE, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=100"]))
    delta = probe.cfg.privacy.delta
    mech = probe.algo.mechanism  # one public mechanism for every silo
    plan = (mech.dp.sampling_rate, mech.steps)
    costs = [_direct_epsilon(plan[0], 1.0, k * plan[1], delta) for k in (1, 2, 3)]
    budget = (costs[1] + costs[2]) / 2
    cfg = load_config(None, [*BASE, "privacy.noise_multiplier=1.0", f"privacy.max_epsilon={budget}",
                             "privacy.target_epsilon=100"])
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    priv = json.loads((res.run_dir / "privacy.json").read_text())
    assert res.rounds_completed == 2 and "every silo has reached its budget" in res.stopped
    for s in priv["silos"]:
        assert sum(1 for e in priv["ledger"] if e["silo"] == s["silo"]) == 2
        assert "round 3" in s["stopped"] and s["epsilon"] == pytest.approx(costs[1], rel=1e-9)
        assert s["epsilon"] <= budget


def _silo_corpus(extra_record: bool):
    from privlm.data.corpus import ClientData, FederatedCorpus

    lines = [f"patient {i} came in with a cough and a mild fever on day {i % 7}" for i in range(120)]
    other = [f"record {i}: follow-up visit, blood pressure normal, no new complaints" for i in range(90)]
    first = lines + (["one more record that only one of the two datasets has"] if extra_record else [])
    clients = (ClientData("a", "\n".join(first), "held-out text of a\n"),
               ClientData("b", "\n".join(other), "held-out text of b\n"))
    return FederatedCorpus("two-silos", clients, {})


def test_the_example_level_mechanism_does_not_depend_on_a_silos_record_count(tmp_path):
    """Issue #18.1: q, steps, z and delta are public; a record more or less changes none of them,
    and privacy.json (which publishes no record count) is the same byte for byte."""
    args = ["privacy.mode=example", "federation.rounds=2", "federation.clients_per_round=2",
            "client.batch_size=8", "model.n_embd=16", "model.n_layer=1", "model.n_head=2",
            "model.block_size=32", "privacy.target_epsilon=2", "privacy.example.max_records=500",
            "eval.max_clients=2", "privacy.seeded_noise=true", "data.scrub.enabled=false"]
    plans, records = [], []
    for extra in (False, True):
        sim = Simulation(load_config(None, args), corpus=_silo_corpus(extra))
        plans.append((sim.algo.mechanism.dp, sim.algo.mechanism.steps, len(sim.silos)))
        sim.run(tmp_path / f"run-{extra}", progress=False)
        records.append((tmp_path / f"run-{extra}" / "privacy.json").read_text())
        delta = sim.cfg.privacy.delta
        assert delta == pytest.approx(500 ** -1.1)
    assert plans[0] == plans[1]
    assert plans[0][0].sampling_rate == 8 / 500  # client.batch_size / max_records
    assert records[0] == records[1]
    assert '"records"' not in records[0]


def test_example_level_refuses_a_mechanism_it_would_derive_from_the_data():
    args = [a for a in BASE if not a.startswith("privacy.example.")]
    with pytest.raises(ConfigError, match="privacy.example.sampling_rate"):
        Simulation(load_config(None, args))
    with pytest.raises(ConfigError, match="privacy.example.max_records"):
        Simulation(load_config(None, [*args, "privacy.example.sampling_rate=0.1"]))
    with pytest.raises(ConfigError, match="more records than the declared bound"):
        Simulation(load_config(None, [*args, "privacy.example.max_records=3"]))


def test_seeded_example_runs_are_reproducible(tmp_path):
    a = Simulation(load_config(None, [*BASE, "privacy.target_epsilon=3"])).run(tmp_path / "a", progress=False)
    b = Simulation(load_config(None, [*BASE, "privacy.target_epsilon=3"])).run(tmp_path / "b", progress=False)
    assert (a.run_dir / "checkpoints/round-0003.safetensors").read_bytes() == \
        (b.run_dir / "checkpoints/round-0003.safetensors").read_bytes()


def test_records_unit_and_silo_grouping():
    from privlm.data.corpus import ClientData, FederatedCorpus, group_into_silos, split_into_records

    assert split_into_records("a b\nc\n\nd\n", "lines") == ["a b", "c", "d"]
    assert split_into_records("a b\nc\n\nd\n", "paragraphs") == ["a b\nc", "d"]
    corpus = FederatedCorpus("t", tuple(ClientData(f"{p}/{r}", f"{p}{r}", "x") for p in "ABCDE" for r in "12"))
    silos = group_into_silos(corpus, 2)
    assert [c.client_id for c in silos.clients] == ["silo-0", "silo-1"]
    assert silos.clients[0].train == "A1\nA2\nC1\nC2\nE1\nE2"  # plays stay whole
    with pytest.raises(ValueError, match="data.silos"):
        group_into_silos(corpus, 6)
