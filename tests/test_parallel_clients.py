"""Clients trained concurrently (``workers``): a speed-up that must not change a single result.

The server sees the same updates in the same order as with one client at a time.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

import privlm.runtime.simulation as simulation
from privlm.config import load_config
from privlm.errors import ConfigError
from privlm.federated import dp_fedavg
from privlm.federated.client import get_params
from privlm.runtime.simulation import Simulation

TINY = ["data.source=synthetic-clinic", "data.num_clients=40", "data.scrub.enabled=false",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "federation.clients_per_round=12", "client.local_steps=2", "eval.max_clients=10",
        "client.optimizer=sgd", "client.lr=0.5", "privacy.noise_multiplier=1.0",
        "privacy.seeded_noise=true", "federation.rounds=3"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``workers > 1`` sets torch's thread count for the process; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_parallel_clients_give_the_sequential_run(tmp_path):
    runs = {}
    for w in (1, 3):
        torch.set_num_threads(1)  # the same kernels both times, so equality can be tight
        cfg = load_config(None, [*TINY, f"workers={w}"])
        runs[w] = Simulation(cfg).run(tmp_path / str(w), progress=False)
    seq, par = runs[1], runs[3]
    for key in ("sampled", "clients", "epsilon", "train_loss", "clipped"):
        assert [m[key] for m in seq.metrics] == [m[key] for m in par.metrics], key
    a = load_file(str(tmp_path / "1" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "3" / "checkpoints" / "round-0003.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_parallel_clients_stream_in_order_with_bounded_work_in_flight(monkeypatch):
    sim = Simulation(load_config(None, [*TINY, "workers=2"]))
    started, running = [], []
    real = simulation.local_train

    def counting(model, params, tokens, cfg, gen):
        started.append(model)
        running.append(1)
        try:
            return real(model, params, tokens, cfg, gen)
        finally:
            running.pop()

    monkeypatch.setattr(simulation, "local_train", counting)
    ids = list(range(20))
    stream = sim.contributions(dp_fedavg.init(sim.algo, get_params(sim.model)), ids)
    first = next(stream)
    assert first.client_id == sim.corpus.clients[0].client_id
    assert len(started) <= 4  # at most 2 x workers clients trained ahead of the consumer
    rest = list(itertools.islice(stream, 5))
    assert [c.client_id for c in rest] == [sim.corpus.clients[i].client_id for i in range(1, 6)]
    stream.close()  # a consumer that stops early (a crash, a rejected round) leaves no work running
    assert not running
    assert len(started) <= 6 + 4  # nothing was trained beyond the 2 x workers window
    assert len(set(map(id, started))) == 2  # two model replicas, never the server's model
    assert all(m is not sim.model for m in started)


def test_workers_are_refused_for_example_level_silos():
    cfg = load_config(None, ["data.source=synthetic-clinic", "data.num_clients=30", "data.silos=3",
                             "privacy.mode=example", "data.scrub.enabled=false", "workers=2",
                             "federation.clients_per_round=3"])
    with pytest.raises(ConfigError, match=r"^workers: "):
        Simulation(cfg)


def test_parallel_clients_with_dropout_are_not_replayable(caplog):
    """Dropout masks come from torch's one global generator, in thread order: such a seeded
    run is not a function of (state, round), so a resume must pay for its lost rounds again."""
    assert Simulation(load_config(None, [*TINY, "model.dropout=0.1"])).replayable
    assert Simulation(load_config(None, [*TINY, "workers=2"])).replayable
    assert "not bit-reproducible" not in caplog.text
    sim = Simulation(load_config(None, [*TINY, "workers=2", "model.dropout=0.1"]))
    assert not sim.replayable
    assert "not bit-reproducible" in caplog.text
