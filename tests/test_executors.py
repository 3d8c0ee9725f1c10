"""The executor contract, for every executor: the stream of contributions for a round is the
sequential executor's, to the bit -- the same clients in the order of ``ids``, the same update
tensors, weights and losses -- and a consumer that stops early leaves the executor usable.

Executors: sequential, 2 threads, 2 worker processes, the Flower grid (loopback: the privlm
ClientApp in this process; real Flower processes are tested in test_flower_deploy.py).
"""

from __future__ import annotations

import pytest
import torch

from privlm.api import Simulation
from privlm.engine.executor import ServerView
from privlm.federated.client import get_params
from privlm.mechanisms.base import Contribution
from privlm.runtime.clients import LocalClients
from privlm.runtime.processes import ProcessExecutor
from privlm.runtime.sequential import SequentialExecutor
from privlm.runtime.threads import ThreadExecutor

EXECUTORS = ["sequential", "threads", "processes", "flower"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(shared_data, *extra):
    from test_flower import _cfg as flower_cfg

    return flower_cfg(shared_data, "data.silos=6", "federation.clients_per_round=3", *extra)


def _executor(kind: str, shared_data, tmp_path):
    if kind == "flower":
        from test_flower import LoopbackGrid

        from privlm.runtime.flower.server_app import FlowerExecutor

        return FlowerExecutor(_cfg(shared_data), LoopbackGrid(6, 6), 6)
    sim = Simulation(_cfg(shared_data))
    clients: LocalClients = sim.clients
    ex = {"sequential": lambda: SequentialExecutor(clients), "threads": lambda: ThreadExecutor(clients, 2),
          "processes": lambda: ProcessExecutor(clients, 2)}[kind]()
    ex.start(tmp_path)
    return ex


@pytest.fixture(scope="module")
def reference(shared_data):
    """The sequential stream for two rounds from the initial parameters: what every executor must give."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the function-scoped _one_thread)
    sim = Simulation(_cfg(shared_data))
    params = get_params(sim.model)
    ex = SequentialExecutor(sim.clients)
    ids = [4, 0, 5, 2]  # not sorted: the order of ids is the order of the stream
    streams = {r: list(ex.contributions(ServerView(params, r, 0.5), ids)) for r in (1, 2)}
    torch.set_num_threads(n)
    return params, ids, streams


@pytest.mark.parametrize("kind", EXECUTORS)
def test_every_executor_yields_the_sequential_stream_to_the_bit(kind, reference, shared_data, tmp_path):
    params, ids, expected = reference
    ex = _executor(kind, shared_data, tmp_path)
    try:
        assert [c.client_id for c in expected[1]] == [ex.population.client_ids[i] for i in ids]
        for r in (1, 2):
            got = list(ex.contributions(ServerView(params, r, 0.5), ids))
            assert all(isinstance(c, Contribution) for c in got), got
            assert [c.client_id for c in got] == [c.client_id for c in expected[r]]
            for a, b in zip(got, expected[r]):
                assert a.weight == b.weight and a.train_loss == pytest.approx(b.train_loss, rel=1e-6)
                assert set(a.update) == set(b.update)
                for k in b.update:
                    assert a.update[k].dtype == b.update[k].dtype
                    assert torch.equal(a.update[k], b.update[k]), (kind, r, a.client_id, k)
        assert any(not torch.equal(  # rounds differ in their batches: the comparison has teeth
            expected[1][0].update[k], expected[2][0].update[k]) for k in params)
    finally:
        ex.close()


@pytest.mark.parametrize("kind", EXECUTORS)
def test_a_consumer_that_stops_early_leaves_the_executor_usable(kind, reference, shared_data, tmp_path):
    params, ids, expected = reference
    ex = _executor(kind, shared_data, tmp_path)
    try:
        stream = ex.contributions(ServerView(params, 1, 0.5), ids)
        first = next(stream)
        stream.close()
        assert first.client_id == expected[1][0].client_id
        again = list(ex.contributions(ServerView(params, 1, 0.5), ids))
        assert [c.client_id for c in again] == [c.client_id for c in expected[1]]
        assert all(torch.equal(a.update[k], b.update[k]) for a, b in zip(again, expected[1]) for k in params)
    finally:
        ex.close()


def test_the_population_and_evaluation_agree_across_executors(shared_data, tmp_path):
    params = None
    seen = {}
    for kind in EXECUTORS:
        (tmp_path / kind).mkdir()
        ex = _executor(kind, shared_data, tmp_path / kind)
        try:
            if params is None:
                params = get_params(Simulation(_cfg(shared_data)).model)
            seen[kind] = (ex.population.client_ids, ex.evaluate(params))
        finally:
            ex.close()
    ids = {k: v[0] for k, v in seen.items()}
    assert len(set(ids.values())) == 1, ids
    losses = {k: v[1] for k, v in seen.items()}
    ref = losses["sequential"]
    for kind, (loss, acc) in losses.items():
        assert loss == pytest.approx(ref[0], rel=1e-6) and acc == pytest.approx(ref[1], rel=1e-6), kind
