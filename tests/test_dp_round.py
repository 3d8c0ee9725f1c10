"""The DP-FedAvg round: clipping bounds contributions, noise has the claimed scale."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privlm.federated import dp_fedavg
from privlm.federated.aggregation import RunningSum, dp_mean, validate_update
from privlm.privacy.mechanism import NoiseSource, clip_update, global_l2_norm


def _params(shapes=((50, 40), (40,), (7, 3, 5))):
    g = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-4, 1e4), clip=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_clip_bounds_global_norm(scale, clip, seed):
    g = torch.Generator().manual_seed(seed)
    upd = {k: torch.randn(v.shape, generator=g) * scale for k, v in _params().items()}
    clipped, norm = clip_update(upd, clip)
    assert global_l2_norm(clipped) <= clip
    assert norm == pytest.approx(global_l2_norm(upd))
    if norm <= clip:  # below the bound: untouched
        assert all(torch.equal(clipped[k], upd[k]) for k in upd)
    else:  # above: same direction, norm C
        assert global_l2_norm(clipped) == pytest.approx(clip, rel=1e-5)


def test_clipping_is_over_all_tensors_together():
    upd = {"a": torch.full((4,), 3.0), "b": torch.full((4,), 4.0)}  # norms 6 and 8, total 10
    clipped, norm = clip_update(upd, 5.0)
    assert norm == pytest.approx(10.0)
    assert torch.allclose(clipped["a"], torch.full((4,), 1.5))
    assert torch.allclose(clipped["b"], torch.full((4,), 2.0))


def test_running_sum_of_huge_updates_is_bounded():
    params = _params()
    rs = RunningSum.zeros_like(params, clip_norm=0.5)
    for i in range(20):
        rs.add({k: torch.full_like(v, 1e5 * (i + 1)) for k, v in params.items()})
    assert rs.count == 20 and rs.clipped == 20
    assert global_l2_norm(rs.total) <= 20 * 0.5 * (1 + 1e-6)


def test_dp_mean_refuses_unclipped_sum():
    rs = RunningSum.zeros_like(_params(), clip_norm=None)
    with pytest.raises(ValueError, match="clipped"):
        dp_mean(rs, 1.0, 10, np.random.default_rng(0))


@pytest.mark.parametrize("bad,reason", [
    ({"p0": torch.full((50, 40), float("nan"))}, "NaN"),
    ({"p0": torch.zeros(50, 41)}, "shape"),
    ({"p0": torch.zeros(50, 40, dtype=torch.float64)}, "dtype"),
    ({"p0": torch.full((50, 40), 1e9)}, "magnitude"),
    ({"p0": torch.full((50, 40), float("inf"))}, "Inf"),
])
def test_malformed_updates_are_rejected_and_never_summed(bad, reason):
    params = _params()
    good = {k: torch.zeros_like(v) for k, v in params.items()}
    assert validate_update(good, params) is None
    broken = {**good, **bad}
    assert reason in validate_update(broken, params)
    assert "missing" in validate_update({"p0": good["p0"]}, params)
    assert "unexpected" in validate_update({**good, "zzz": torch.zeros(1)}, params)
    assert "not a mapping" in validate_update([1, 2], params)
    algo = dp_fedavg.DPFedAvg(num_clients=100, clients_per_round=10, mode="none")
    state = dp_fedavg.init(algo, params)
    contribs = [dp_fedavg.Contribution("good", {k: torch.ones_like(v) for k, v in params.items()}, 1.0),
                dp_fedavg.Contribution("evil", broken, 1e6)]
    new, stats = dp_fedavg.apply(algo, state, contribs, None)
    assert stats.clients == 1 and stats.rejected == 1 and stats.rejections[0][0] == "evil"
    for k in params:  # exactly the good update was applied
        assert torch.allclose(new.params[k], params[k] + 1)


def test_zero_updates_give_noise_of_std_zC_over_qN():
    """With all local updates zero the round's change is pure noise: N(0, (zC/(qN))^2)."""
    params = {"w": torch.zeros(200_000)}
    N, m, z, C = 1000, 50, 1.3, 0.7
    algo = dp_fedavg.DPFedAvg(num_clients=N, clients_per_round=m, mode="user", clip_norm=C,
                              noise_multiplier=z)
    state = dp_fedavg.init(algo, params)
    ids = algo.sample_clients(np.random.default_rng(0))
    contribs = (dp_fedavg.Contribution(str(i), {"w": torch.zeros(200_000)}) for i in ids)
    new, stats = dp_fedavg.apply(algo, state, contribs, NoiseSource(seed=1).generator(1))
    delta = new.params["w"] - params["w"]
    expected = z * C / (m / N * N)
    assert stats.clients == len(ids)
    assert abs(float(delta.std()) / expected - 1) < 0.02
    assert abs(float(delta.mean())) < 4 * expected / math.sqrt(delta.numel())


def test_fixed_denominator_does_not_depend_on_turnout():
    params = {"w": torch.zeros(10)}
    algo = dp_fedavg.DPFedAvg(num_clients=100, clients_per_round=10, clip_norm=1.0,
                              noise_multiplier=1e-9)
    state = dp_fedavg.init(algo, params)
    one = [dp_fedavg.Contribution("a", {"w": torch.full((10,), 0.1)})]
    new, _ = dp_fedavg.apply(algo, state, one, NoiseSource(seed=0).generator(1))
    # one client of an expected 10: mean = update / 10, not update / 1
    assert torch.allclose(new.params["w"], torch.full((10,), 0.01), atol=1e-6)


def test_poisson_sampling_rate():
    algo = dp_fedavg.DPFedAvg(num_clients=2000, clients_per_round=100)
    rng = np.random.default_rng(0)
    sizes = [len(algo.sample_clients(rng)) for _ in range(200)]
    assert abs(np.mean(sizes) - 100) < 3  # E = qN = 100, sd of mean ~0.7
    assert np.std(sizes) > 5  # Poisson, not fixed-size


def test_secure_noise_differs_seeded_noise_repeats():
    a, b = NoiseSource().generator(1), NoiseSource().generator(1)
    assert not np.array_equal(a.standard_normal(8), b.standard_normal(8))
    a, b = NoiseSource(seed=3).generator(5), NoiseSource(seed=3).generator(5)
    assert np.array_equal(a.standard_normal(8), b.standard_normal(8))
    c = NoiseSource(seed=3).generator(6)
    assert not np.array_equal(NoiseSource(seed=3).generator(5).standard_normal(8), c.standard_normal(8))
    assert NoiseSource().secure and not NoiseSource(seed=0).secure


def test_secure_noise_key_has_128_bits(monkeypatch):
    """Keys differing only above bit 64 must give different noise (no truncated seed)."""
    import secrets

    keys = iter([5, 5 + (1 << 100)])
    monkeypatch.setattr(secrets, "randbits", lambda n: next(keys))
    a, b = NoiseSource().generator(1), NoiseSource().generator(1)
    assert not np.array_equal(a.standard_normal(8), b.standard_normal(8))


def test_fedavgm_applies_server_momentum():
    from privlm.federated.server_opt import ServerOptimizer

    opt = ServerOptimizer("fedavgm", lr=0.5, beta1=0.9)
    params = {"w": torch.zeros(3)}
    u = {"w": torch.tensor([1.0, -2.0, 0.0])}
    state = opt.init(params)
    p1, state = opt.apply(params, state, u)
    p2, state = opt.apply(p1, state, u)
    assert torch.allclose(p1["w"], 0.5 * u["w"])
    assert torch.allclose(p2["w"], p1["w"] + 0.5 * (0.9 * u["w"] + u["w"]))
