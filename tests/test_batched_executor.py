"""The batched executor (``worker_kind = "batched"``): K clients' local steps as one vmapped
computation, held to the sequential executor's stream.

Tolerance. Not to the bit, as the other executors are: a batched matmul (and the math form of
attention the batched executor uses) sums in another order than the sequential kernels, in
float32. SGD updates agree to ``atol=1e-6, rtol=1e-4`` (max abs diff seen: ~1.5e-7). Adam divides
by the root of the squared gradients, so a rounding difference is amplified where a gradient is
pure rounding noise: the attention's key bias, whose true gradient is 0 (softmax is invariant to
a constant added to every key score of a query). There both executors' updates are noise of up
to lr per step -- the sequential executor on 1 and on 2 torch threads differs as much there --
so Adam is compared on every other tensor, to ``atol=5e-4, rtol=1e-3`` (max seen: ~7e-5, on
updates of ~1e-1). Losses agree to rel 1e-5, weights (token counts) exactly.
"""

from __future__ import annotations

import pytest
import torch

from privlm.api import Simulation
from privlm.config import load_config
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.engine.executor import ServerView
from privlm.errors import ConfigError
from privlm.federated.client import get_params
from privlm.runtime import batched
from privlm.runtime.batched import BatchedExecutor
from privlm.runtime.sequential import SequentialExecutor

TINY = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16",
        "client.batch_size=4", "client.lr=0.05", "federation.rounds=3", "federation.clients_per_round=3",
        "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.5", "privacy.seeded_noise=true",
        "eval.every=1", "seed=3"]
VERSE = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")
# Clients of 40 to 700 characters: 3 to 44 windows of 16, so 1 to 11 batches of 4 per epoch; the
# last batch is short for most; "c4" has one character, so no training target and no step.
SIZES = [40, 300, 95, 700, 1, 170]
IDS = [3, 0, 5, 1, 4, 2]  # not sorted: the order of ids is the order of the stream


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _corpus() -> FederatedCorpus:
    text = VERSE * 8
    return FederatedCorpus("verse", tuple(ClientData(f"c{i}", text[7 * i : 7 * i + n], "held-out text of the play")
                                          for i, n in enumerate(SIZES)))


def _sim(*extra: str) -> Simulation:
    return Simulation(load_config(None, [*TINY, *extra]), corpus=_corpus())


def _key_bias(name: str, n_embd: int = 16) -> slice | None:
    return slice(n_embd, 2 * n_embd) if name.endswith("attn.qkv.bias") else None


def _compare(got, expected, optimizer: str) -> float:
    """Assert the two streams agree (see the module's docstring); the max abs diff compared."""
    assert [c.client_id for c in got] == [c.client_id for c in expected]
    worst = 0.0
    for a, b in zip(got, expected):
        assert a.weight == b.weight
        assert (a.train_loss is None) == (b.train_loss is None)
        if b.train_loss is not None:
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert set(a.update) == set(b.update)
        for k, ref in b.update.items():
            x, y = a.update[k], ref
            assert x.dtype == y.dtype and x.shape == y.shape
            if optimizer == "adam" and (s := _key_bias(k)) is not None:
                keep = torch.ones_like(y, dtype=torch.bool)
                keep[s] = False
                x, y = x[keep], y[keep]
            atol, rtol = (5e-4, 1e-3) if optimizer == "adam" else (1e-6, 1e-4)
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=f"{a.client_id} {k}")
            worst = max(worst, float((x - y).abs().max()))
    return worst


@pytest.fixture(scope="module")
def streams():
    """Sequential streams for rounds 1 and 2, per (optimizer, steps or epochs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for opt in ("sgd", "adam"):
        for local in ("client.local_steps=5", "client.local_epochs=2"):
            sim = _sim(f"client.optimizer={opt}", local)
            params = get_params(sim.model)
            ex = SequentialExecutor(sim.clients)
            out[opt, local] = sim, params, {r: list(ex.contributions(ServerView(params, r, 0.5), IDS)) for r in (1, 2)}
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("local", ["client.local_steps=5", "client.local_epochs=2"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("k", [1, 4, 6, 8])  # K below, at and above the 6 sampled clients
def test_batched_updates_equal_the_sequential_ones(streams, opt, local, k):
    sim, params, expected = streams[opt, local]
    ex = BatchedExecutor(sim.clients, k)
    for r in (1, 2):
        got = list(ex.contributions(ServerView(params, r, 0.5), IDS))
        worst = _compare(got, expected[r], opt)
        print(f"{opt} {local} K={k} round {r}: max abs diff {worst:.2e}")
    # The comparison has teeth: clients' updates differ, are non-zero (but the one with no target's),
    # rounds differ in their batches, and clients ran different numbers of steps.
    updates = {c.client_id: torch.cat([u.flatten() for u in c.update.values()]) for c in expected[1]}
    assert float(updates["c4"].abs().max()) == 0 and expected[1][IDS.index(4)].train_loss is None
    moving = [u for cid, u in updates.items() if cid != "c4"]
    assert all(float(u.abs().max()) > 1e-3 for u in moving)
    assert all(float((a - b).abs().max()) > 1e-3 for i, a in enumerate(moving) for b in moving[i + 1 :])
    assert any(not torch.equal(expected[1][0].update[n], expected[2][0].update[n]) for n in params)
    assert sim.clients.train_tokens[3].numel() > 10 * sim.clients.train_tokens[0].numel()


def test_a_wrong_executor_fails_the_comparison(streams):
    """E.g. every client's windows in one order (not its own generator's): the comparison sees it."""
    sim, params, expected = streams["sgd", "client.local_epochs=2"]
    ex = BatchedExecutor(sim.clients, 4)
    real = batched.batch_order
    try:
        batched.batch_order = lambda n, local, gen: real(n, local, torch.Generator().manual_seed(0))
        got = list(ex.contributions(ServerView(params, 1, 0.5), IDS))
    finally:
        batched.batch_order = real
    with pytest.raises(AssertionError):
        _compare(got, expected[1], "sgd")


def test_a_clients_update_does_not_depend_on_the_others_in_its_chunk(streams):
    """On the CPU, to the bit: the last chunk is padded to K, and each client only ever reads its own rows."""
    sim, params, _ = streams["adam", "client.local_epochs=2"]
    view = ServerView(params, 1, 0.5)
    alone = {c.client_id: c for c in BatchedExecutor(sim.clients, 1).contributions(view, IDS)}
    for k, ids in ((4, IDS), (4, IDS[::-1]), (8, IDS[:2])):
        for c in BatchedExecutor(sim.clients, k).contributions(view, ids):
            assert all(torch.equal(c.update[n], alone[c.client_id].update[n]) for n in params), (k, c.client_id)


def test_chunks_of_k_are_trained_one_at_a_time_and_streamed(streams, monkeypatch):
    sim, params, expected = streams["sgd", "client.local_steps=5"]
    ex = BatchedExecutor(sim.clients, 4)
    chunks = []
    train = ex._train
    monkeypatch.setattr(ex, "_train", lambda view, chunk: (chunks.append(list(chunk)), train(view, chunk))[1])
    stream = ex.contributions(ServerView(params, 1, 0.5), IDS)
    assert next(stream).client_id == expected[1][0].client_id and chunks == [IDS[:4]]
    assert len(list(stream)) == len(IDS) - 1 and chunks == [IDS[:4], IDS[4:]]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_a_batched_run_ends_where_the_sequential_one_does(tmp_path, opt):
    seq = _sim(f"client.optimizer={opt}", "client.local_epochs=2").run(tmp_path / "seq", progress=False)
    sim = _sim(f"client.optimizer={opt}", "client.local_epochs=2", "worker_kind=batched", "workers=2")
    assert isinstance(sim.executor, BatchedExecutor) and sim.replayable
    res = sim.run(tmp_path / "batched", progress=False)
    assert res.rounds_completed == seq.rounds_completed == 3
    assert res.epsilon == seq.epsilon and res.epsilon is not None
    for key in ("sampled", "clients", "clipped", "epsilon"):
        assert [m[key] for m in res.metrics] == [m[key] for m in seq.metrics], key
    assert [m["eval_loss"] for m in res.metrics] == pytest.approx([m["eval_loss"] for m in seq.metrics], rel=1e-4)
    assert res.eval_loss == pytest.approx(seq.eval_loss, rel=1e-4) and res.eval_loss != seq.metrics[0]["eval_loss"]


@pytest.mark.parametrize("extra, field", [
    (["privacy.mode=example"], "worker_kind"),
    (["model.kind=hf", "model.path=/nonexistent"], "model.kind"),
    (["model.kind=lstm"], "model.kind"),
    (["model.dropout=0.1"], "model.dropout"),
])
def test_what_the_batched_executor_cannot_train_is_refused_in_one_line(extra, field):
    with pytest.raises(ConfigError) as e:
        _sim("worker_kind=batched", "workers=2", *extra)
    assert str(e.value).startswith(f"{field}: ") and "batched" in str(e.value) and "\n" not in str(e.value)


def test_a_model_with_dropout_is_refused_by_the_executor_too(streams):
    sim, _, _ = streams["sgd", "client.local_steps=5"]
    drop = sim.model.blocks[0].mlp.drop
    drop.p = 0.1
    try:
        with pytest.raises(ConfigError, match=r"^model\.dropout: "):
            BatchedExecutor(sim.clients, 2)
    finally:
        drop.p = 0.0
