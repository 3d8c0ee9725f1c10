"""The character LSTM of McMahan et al. 2017 and the learning-rate schedules (issue #20.A)."""

import math

import pytest
import torch

from privlm.config import load_config
from privlm.errors import ConfigError


def test_learning_rate_schedules_are_a_function_of_the_round_only():
    import math

    from privlm.federated.schedule import scheduled_lr
    from privlm.federated.server_opt import ServerOptimizer
    from privlm.runtime.training import local_training

    assert [scheduled_lr(0.5, "constant", r, 10, 0.1) for r in (1, 5, 10)] == [0.5, 0.5, 0.5]
    lrs = [scheduled_lr(1.0, "cosine", r, 11, 0.1) for r in range(1, 12)]
    assert lrs[0] == 1.0 and math.isclose(lrs[-1], 0.1) and math.isclose(lrs[5], 0.55)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    cfg = load_config(None, ["client.lr=0.8", "client.lr_schedule=cosine", "client.lr_final=0.25",
                             "federation.rounds=3"])
    assert [local_training(cfg, r).lr for r in (1, 2, 3)] == [0.8, 0.8 * 0.625, 0.8 * 0.25]
    assert local_training(load_config(None, ["client.lr=0.8"]), 3).lr == 0.8
    opt = ServerOptimizer(lr=2.0, schedule="cosine", rounds=3, lr_final=0.5)
    p, m = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    assert [float(opt.apply(p, {}, m, r)[0]["w"][0]) for r in (1, 2, 3)] == [2.0, 1.5, 1.0]


def test_the_lstm_of_mcmahan_et_al_trains_in_a_run(tmp_path):
    from privlm.api import Simulation

    cfg = load_config(None, ["model.kind=lstm", "model.block_size=20", "model.lstm_hidden=16", "data.num_clients=12",
                             "data.scrub.enabled=false", "federation.rounds=2", "federation.clients_per_round=4",
                             "client.local_steps=2", "privacy.mode=none", "eval.max_clients=3",
                             "client.lr_schedule=cosine", "server.lr_schedule=cosine"])
    sim = Simulation(cfg)
    assert type(sim.model).__name__ == "CharLSTM" and sim.model.num_params() == (
        256 * 8 + 4 * 16 * (8 + 16 + 2) + 4 * 16 * (16 + 16 + 2) + 16 * 256 + 256)
    res = sim.run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 2 and math.isfinite(res.eval_loss)
    assert CharLSTM_default_params() == 866_560  # embedding 8, 2 x 256, byte vocabulary
    with pytest.raises(ConfigError, match="DPLSTM"):
        Simulation(load_config(None, ["model.kind=lstm", "privacy.mode=example", "data.silos=3",
                                      "privacy.example.max_records=5000", "data.num_clients=12",
                                      "federation.clients_per_round=2"]))


def CharLSTM_default_params() -> int:  # noqa: N802
    from privlm.models.lstm import CharLSTM, LSTMConfig

    return CharLSTM(LSTMConfig()).num_params()
