"""Adaptive clipping (Andrew et al. 2021): the clip norm tracks a quantile of the update norms,
the count it learns from is noised, and the round still costs exactly one Gaussian mechanism
with multiplier z (the update noise is raised to z' to pay for the count)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from privlm.config import load_config
from privlm.errors import ConfigError
from privlm.federated import dp_fedavg
from privlm.federated.dp_fedavg import AdaptiveClipping, Contribution, DPFedAvg
from privlm.privacy import epsilon_for
from privlm.api import Simulation

M = 100  # clients per round (q = 1 here: every client every round)


def _algo(z: float = 1.0, quantile: float = 0.5, clip: float = 0.1, stddev: float | None = None) -> DPFedAvg:
    return DPFedAvg(num_clients=M, clients_per_round=M, clip_norm=clip, noise_multiplier=z,
                    adaptive=AdaptiveClipping(quantile, 0.2, M / 20 if stddev is None else stddev))


def _contributions(norms: np.ndarray, rng: np.random.Generator, dim: int = 8) -> list[Contribution]:
    out = []
    for i, n in enumerate(norms):
        d = rng.standard_normal(dim)
        out.append(Contribution(f"c{i}", {"w": torch.tensor(d / np.linalg.norm(d) * n, dtype=torch.float32)}))
    return out


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_clip_norm_converges_to_the_target_quantile(quantile):
    """Norms ~ 2 * lognormal(0, 0.5): the clip norm settles where a fraction `quantile` is below it."""
    rng = np.random.default_rng(0)
    algo = _algo(quantile=quantile)
    state = dp_fedavg.init(algo, {"w": torch.zeros(8)})
    assert state.clip_norm == pytest.approx(0.1)
    history = []
    for _ in range(150):
        norms = 2.0 * np.exp(rng.normal(0, 0.5, M))
        state, stats = dp_fedavg.apply(algo, state, _contributions(norms, rng), np.random.default_rng(rng.integers(2**32)))
        history.append(state.clip_norm)
    settled = float(np.mean(history[-50:]))
    want = 2.0 * math.exp(0.5 * {0.5: 0.0, 0.9: 1.2816}[quantile])  # the true quantile of the norms
    assert settled == pytest.approx(want, rel=0.1), (settled, want)
    assert history[0] < history[10] < history[30]  # it grows geometrically from C0 = 0.1


def test_update_noise_pays_for_the_count_and_the_round_costs_one_gaussian_with_z():
    z, sigma_b = 1.0, 5.0
    adaptive = _algo(z=z, stddev=sigma_b)
    fixed = DPFedAvg(num_clients=M, clients_per_round=M, clip_norm=0.1, noise_multiplier=z)
    z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert adaptive.update_noise_multiplier == pytest.approx(z_update) and z_update > z
    assert adaptive.round_event() == fixed.round_event()
    eps_a = epsilon_for([adaptive.round_event()] * 50, 1e-5, "pld")
    assert eps_a == epsilon_for([fixed.round_event()] * 50, 1e-5, "pld")
    # The noise actually added: zero updates, so the mean is pure noise of std z' C / m.
    state = dp_fedavg.init(adaptive, {"w": torch.zeros(200_000)})
    zero = [Contribution(f"c{i}", {"w": torch.zeros(200_000)}) for i in range(3)]
    new, _ = dp_fedavg.apply(adaptive, state, zero, np.random.default_rng(1))
    assert float(new.params["w"].std()) == pytest.approx(z_update * 0.1 / M, rel=0.01)


def test_the_count_is_noised_with_sigma_b():
    """Every norm below C: the true fraction is 1, the noised one is 1 + N(0, (sigma_b/m)^2)."""
    sigma_b, eta = 5.0, 0.2
    algo = _algo(stddev=sigma_b, clip=10.0)
    rng = np.random.default_rng(3)
    fractions = []
    for k in range(400):
        state = dp_fedavg.init(algo, {"w": torch.zeros(8)})
        new, _ = dp_fedavg.apply(algo, state, _contributions(np.full(M, 1.0), rng), np.random.default_rng(k))
        fractions.append(0.5 - math.log(new.clip_norm / 10.0) / eta)  # invert C' = C exp(-eta (b - gamma))
    assert np.mean(fractions) == pytest.approx(1.0, abs=0.01)
    assert np.std(fractions) == pytest.approx(sigma_b / M, rel=0.1)


def test_too_little_count_noise_for_the_requested_z_is_an_error(shared_data):
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        _algo(z=2.0, stddev=1.0)  # 2 sigma_b = 2 <= z: nothing left for the update noise
    with pytest.raises(ConfigError, match="privacy.clipped_count_stddev"):
        Simulation(load_config(None, ["data.source=tinyshakespeare", f'data.path="{shared_data / "tinyshakespeare.txt"}"',
                                      "privacy.adaptive_clipping=true", "privacy.noise_multiplier=3",
                                      "privacy.clipped_count_stddev=1", "federation.clients_per_round=20"]))
    with pytest.raises(ConfigError, match="adaptive_clipping"):
        load_config(None, ["privacy.mode=example", "privacy.adaptive_clipping=true"])


@pytest.mark.slow
def test_a_run_with_adaptive_clipping_reports_it_and_costs_what_a_fixed_run_costs(shared_data, tmp_path):
    base = ["data.source=tinyshakespeare", f'data.path="{shared_data / "tinyshakespeare.txt"}"',
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
            "client.local_steps=2", "client.batch_size=8", "federation.rounds=6", "federation.clients_per_round=40",
            "privacy.target_epsilon=4", "privacy.seeded_noise=true", "eval.max_clients=20", "seed=2"]
    fixed = Simulation(load_config(None, base)).run(tmp_path / "fixed", progress=False)
    adaptive = Simulation(load_config(None, [*base, "privacy.adaptive_clipping=true"])).run(tmp_path / "ad", progress=False)
    assert adaptive.epsilon == fixed.epsilon and adaptive.epsilon <= 4
    norms = [r["clip_norm"] for r in adaptive.metrics]
    assert norms[0] != norms[-1] and all(n > 0 for n in norms)
    assert all(r["clip_norm"] == 2.0 for r in fixed.metrics)  # privacy.clip_norm's default
    priv = json.loads((tmp_path / "ad" / "privacy.json").read_text())
    a = priv["adaptive_clipping"]
    assert a["initial_clip_norm"] == 0.1 and a["target_quantile"] == 0.5 and a["learning_rate"] == 0.2
    assert a["clipped_count_stddev"] == pytest.approx(40 / 20)
    z = priv["noise_multiplier"]
    assert a["update_noise_multiplier"] == pytest.approx((z**-2 - (2 * 2.0) ** -2) ** -0.5)
    assert "adaptive clipping" in priv["guarantee"]
