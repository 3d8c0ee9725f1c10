"""Mechanisms and aggregators as separate pieces: the seams hold the guarantee's invariants.

Noise is released only on a sum clipped to this round's C; an aggregator refuses an update whose
scale does not clip it; a pre-summed (secure-aggregation) sum is checked before it is trusted; the
engine refuses a mechanism of another mode and a second run over the same accounts.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch

from privlm.config import load_config
from privlm.federated import dp_fedavg
from privlm.federated.aggregators import Buffered, PreSummed, StreamingSum
from privlm.federated.dp_sgd import ExampleDP
from privlm.mechanisms import (AdaptiveClipGaussian, AdaptiveClipping, Contribution, GaussianFedAvg,
                               NonPrivateFedAvg, SiloDPSGD)

LIKE = {"w": torch.zeros(4, 3), "b": torch.zeros(5)}


def _updates(n: int, scale: float = 1.0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) * scale for k, v in LIKE.items()} for _ in range(n)]


def _records(mech, state, updates):
    return [mech.preprocess(Contribution(f"c{i}", u, 10.0), state, LIKE) for i, u in enumerate(updates)]


def test_every_mechanism_costs_one_public_event_and_samples_as_it_is_accounted():
    g = GaussianFedAvg(100, 10, 1.0, 1.3)
    a = AdaptiveClipGaussian(100, 10, 1.0, 1.3, AdaptiveClipping(count_stddev=2.0))
    assert g.event() == a.event() == dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.3))
    assert isinstance(NonPrivateFedAvg(100, 10).event(), dp_accounting.NonPrivateDpEvent)
    silo = SiloDPSGD(4, 2, ExampleDP(0.05, 1.1, 1.0), 3, 1e-5)
    assert silo.event() == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 3)
    sizes = [len(g.sample(np.random.default_rng(s))) for s in range(300)]
    assert 9 < np.mean(sizes) < 11 and len(set(sizes)) > 3  # Poisson: the size varies
    assert {len(NonPrivateFedAvg(100, 10).sample(np.random.default_rng(s))) for s in range(20)} == {10}
    with pytest.raises(ValueError, match="needs noise"):
        SiloDPSGD(4, 2, ExampleDP(0.05, 0.0, 1.0), 3, 1e-5)  # a silo mechanism without noise


def test_the_buffered_sum_is_the_streaming_sum_to_the_bit():
    mech, state = GaussianFedAvg(100, 10, 1.0, 1.0), {}
    records = _records(mech, state, _updates(7, 0.8))
    streaming, buffered = StreamingSum(LIKE, 1.0), Buffered(LIKE, 1.0)
    for r in records:
        streaming.add(r)
        buffered.add(r)
    a, b = streaming.result(), buffered.result()
    assert (a.count, a.clipped) == (b.count, b.clipped) == (7, sum(r.clipped for r in records)) and a.clipped > 0
    assert all(torch.equal(a.total[k], b.total[k]) for k in LIKE)
    assert len(buffered.records) == 7  # what robust statistics will read


def test_noise_is_released_only_on_a_sum_clipped_to_this_rounds_c():
    """Review finding: noise calibrated to one C on a sum clipped to another (e.g. an aggregator
    built for an earlier round's adaptive C) gave too little noise."""
    mech = GaussianFedAvg(100, 10, 1.0, 1.0)
    wrong = StreamingSum(LIKE, 1e-6)
    with pytest.raises(ValueError, match="not to this round's C"):
        mech.release(wrong.result(), {}, np.random.default_rng(0))
    adaptive = AdaptiveClipGaussian(100, 10, 0.1, 1.0, AdaptiveClipping(count_stddev=2.0))
    with pytest.raises(ValueError, match="not to this round's C"):
        adaptive.release(StreamingSum(LIKE, 0.1).result(), {"clip_norm": 0.5}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unclipped"):
        NonPrivateFedAvg(100, 10).release(StreamingSum(LIKE, 1.0).result(), {}, None)


def test_an_aggregator_refuses_an_update_whose_scale_does_not_clip_it():
    """Review finding: a record's factor was trusted; a factor of 1 on a big update was noised as if clipped."""
    mech = GaussianFedAvg(100, 10, 1.0, 1.0)
    (good,) = _records(mech, {}, _updates(1, 10.0))
    assert good.clipped and good.factor * good.norm <= 1.0
    agg = StreamingSum(LIKE, 1.0)
    agg.add(good)
    forged = type(good)(good.client_id, good.update, 1.0, 1.0, True, good.norm)
    with pytest.raises(ValueError, match="not clipped"):
        agg.add(forged)
    with pytest.raises(ValueError, match="not clipped"):
        agg.add(type(good)(good.client_id, good.update, good.factor, 1.0, True, None))  # no norm measured
    with pytest.raises(ValueError, match="not clipped"):
        agg.add(type(good)(good.client_id, good.update, good.factor, 3.0, True, good.norm))  # weight 3 under DP
    assert agg.result().count == 1


def test_a_pre_summed_aggregate_is_checked_before_it_is_trusted():
    mech, C = GaussianFedAvg(100, 10, 1.0, 1.0), 1.0
    records = _records(mech, {}, _updates(5, 3.0))
    reference = StreamingSum(LIKE, C)
    for r in records:
        reference.add(r)
    ref = reference.result()
    ok = PreSummed(LIKE, C)
    with pytest.raises(TypeError):
        ok.add(records[0])
    ok.set_sum({k: v.clone() for k, v in ref.total.items()}, ref.count, ref.clipped, C)
    noised = mech.release(ok.result(), {}, np.random.default_rng(1))[0]
    expected = mech.release(ref, {}, np.random.default_rng(1))[0]
    assert all(torch.equal(noised[k], expected[k]) for k in LIKE)
    bad = [
        (dict(ref.total), 5, 2, 2.0, "clipped to 2"),  # the clients' C is not this round's
        (dict(ref.total), 5, 6, C, "clipped <= count"),
        (dict(ref.total), -1, 0, C, "clipped <= count"),
        ({"w": torch.zeros(4, 3)}, 5, 0, C, "missing"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(1)}, 5, 0, C, "shape"),  # would broadcast
        ({"w": torch.full((4, 3), float("nan")), "b": torch.zeros(5)}, 5, 0, C, "NaN"),
        ({"w": torch.full((4, 3), 10.0), "b": torch.zeros(5)}, 5, 0, C, "exceeds count"),
    ]
    for total, count, clipped, c, words in bad:
        with pytest.raises(ValueError, match=words):
            PreSummed(LIKE, C).set_sum(total, count, clipped, c)


def test_apply_makes_the_aggregator_for_this_rounds_c():
    algo = dp_fedavg.FedAvg(AdaptiveClipGaussian(10, 5, 0.1, 1.0, AdaptiveClipping(count_stddev=2.0)))
    state = dp_fedavg.init(algo, LIKE)
    contributions = [Contribution(f"c{i}", u, 1.0) for i, u in enumerate(_updates(5, 0.05))]
    previous = 0.1
    for r in range(3):
        state, stats = dp_fedavg.apply(algo, state, contributions, np.random.default_rng(r))
        assert stats.clip_norm == previous  # each round clips to its own C
        previous = state.clip_norm
    assert previous != 0.1


def test_the_engine_refuses_a_mechanism_of_another_mode_and_a_second_run(tmp_path):
    from privlm.api import Simulation
    from privlm.engine.rounds import Engine

    cfg = load_config(None, ["data.source=synthetic-clinic", "data.num_clients=12", "data.scrub.enabled=false",
                             "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16",
                             "federation.rounds=1", "federation.clients_per_round=3", "client.local_steps=1",
                             "privacy.noise_multiplier=1.0", "eval.max_clients=2", "privacy.seeded_noise=true"])
    sim = Simulation(cfg)
    e = sim.engine
    with pytest.raises(ValueError, match="'none' mechanism cannot run"):
        Engine(e.cfg, e.privacy, dp_fedavg.FedAvg(NonPrivateFedAvg(12, 3)), e.executor, e.model)
    sim.run(tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="has run"):  # its ledger would be replayed, unpaid, into b
        sim.run(tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_validation_through_the_norm_gives_validate_updates_verdicts():
    """The preprocessing validates values through the float64 norm (one pass); its verdicts are
    validate_update's on every kind of update, including a valid one whose norm exceeds the bound."""
    from privlm.federated.aggregation import MAX_ABS_VALUE, validate_and_norm, validate_update
    from privlm.privacy.mechanism import global_l2_norm

    def with_w(value):
        w = torch.zeros(4, 3)
        w.view(-1)[5] = value
        return {"w": w, "b": torch.ones(5)}

    cases = [
        _updates(1)[0], with_w(float("nan")), with_w(float("inf")), with_w(-float("inf")),
        with_w(2 * MAX_ABS_VALUE), with_w(MAX_ABS_VALUE),
        {"w": torch.full((4, 3), 0.9 * MAX_ABS_VALUE), "b": torch.zeros(5)},  # norm > bound, values fine
        {"w": torch.zeros(4, 3)}, {"w": torch.zeros(4, 3), "b": torch.zeros(6)}, "garbage",
        {"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(5)},
    ]
    for update in cases:
        reason, norm = validate_and_norm(update, LIKE)
        assert reason == validate_update(update, LIKE), update
        if reason is None:
            assert norm == global_l2_norm(update)
