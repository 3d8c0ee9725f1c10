"""Clipping bounds every update by C in the arithmetic actually used (issue #18, point 5).

The reference norm here is as exact as float64 allows: squares of float32/bfloat16 values
are exact in float64 and ``math.fsum`` sums them with one rounding. Updates are built with
norms within a relative 1e-5 of C (where float32 norms and sums used to let C slip), and the
sum's sensitivity is checked on correlated updates (whose clipped sum has norm ~k*C), the
extra client added at a random place in the sequence.
"""

import math

import numpy as np
import pytest
import torch

from privlm.federated import dp_fedavg
from privlm.federated.aggregation import RunningSum, dp_mean, weighted_mean
from privlm.privacy.mechanism import clip_update, global_l2_norm

SHAPES = [(1,), (7,), (64,), (13, 11), (32, 17), (3, 5, 4)]


def exact_norm(update) -> float:
    return math.sqrt(math.fsum(float(x) ** 2 for t in update.values() for x in t.double().flatten().numpy()))


def random_update(rng: np.random.Generator, dtype: torch.dtype, scale: float = 1.0) -> dict[str, torch.Tensor]:
    names = rng.choice(len(SHAPES), size=rng.integers(1, 5), replace=False)
    return {f"p{i}": torch.from_numpy(rng.standard_normal(SHAPES[i]) * scale).to(dtype) for i in sorted(names)}


def near_c_cases(dtype: torch.dtype, n: int = 300):
    """(update, C, exact norm): C set from the update's exact norm, so norm/C - 1 is what is asked."""
    rng = np.random.default_rng(0)
    for i in range(n):
        update = random_update(rng, dtype, scale=10.0 ** rng.uniform(-3, 3))
        norm = exact_norm(update)
        # most just above C (norm/C - 1 log-uniform in [1e-10, 1e-5]); every fourth just below
        excess = 10.0 ** rng.uniform(-10, -5)
        yield update, norm / (1 - excess if i % 4 == 0 else 1 + excess), norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_update_has_norm_at_most_c(dtype):
    worst_clip, worst_sum, above, miscounted, touched = 0.0, 0.0, 0, 0, 0
    for update, C, norm in near_c_cases(dtype):
        above += norm > C
        clipped, _ = clip_update(update, C)
        assert all(clipped[k].dtype == dtype for k in update)
        worst_clip = max(worst_clip, exact_norm(clipped) / C)
        running = RunningSum.zeros_like(update, C)  # one update into a zero sum: the update as added
        running.add(update)
        worst_sum = max(worst_sum, exact_norm(running.total) / C)
        miscounted += running.clipped != (norm > C)
        if norm < C * (1 - 2e-6):  # clearly below the bound: untouched
            touched += not all(torch.equal(clipped[k], update[k]) for k in update)
    assert above >= 200
    assert worst_clip <= 1, f"clip_update left norm {worst_clip!r} * C"
    assert worst_sum <= 1, f"RunningSum.add added norm {worst_sum!r} * C"
    assert miscounted == 0  # "clipped" counts exactly the updates of norm > C
    assert touched == 0


def correlated_updates(rng: np.random.Generator, k: int, dtype: torch.dtype, C: float):
    """k updates of norm >= ~30 C sharing one direction (so their clipped sum has norm ~k C)."""
    shapes = [SHAPES[i] for i in sorted(rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False))]
    base = [rng.standard_normal(s) for s in shapes]
    for _ in range(k):
        yield {f"p{i}": torch.from_numpy((b + 0.3 * rng.standard_normal(b.shape)) * 30 * C).to(dtype)
               for i, b in enumerate(base)}


def sensitivity(seed: int, dtype: torch.dtype, C: float, k: int = 50) -> float:
    """||sum with one more client - sum without it|| / C, the extra client at a random place."""
    rng = np.random.default_rng(seed)
    *others, extra = correlated_updates(rng, k + 1, dtype, C)
    position = int(rng.integers(0, k + 1))
    without = RunningSum.zeros_like(extra, C)
    with_extra = RunningSum.zeros_like(extra, C)
    for u in others[:position]:
        with_extra.add(u)
        without.add(u)
    with_extra.add(extra)
    for u in others[position:]:
        with_extra.add(u)
        without.add(u)
    assert with_extra.clipped == k + 1
    return exact_norm({n: with_extra.total[n].double() - without.total[n].double() for n in extra}) / C


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_client_changes_the_dp_sum_by_at_most_c(dtype):
    worst = max(sensitivity(seed, dtype, C) for seed in range(100) for C in (2.0, 0.37))
    assert worst <= 1, f"sensitivity {worst!r} * C"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_means_and_params_keep_the_parameters_dtype(dtype):
    params = {"a": torch.zeros(5, 3, dtype=dtype), "b": torch.zeros(4, dtype=dtype)}
    update = {k: torch.ones_like(v) for k, v in params.items()}
    dp = RunningSum.zeros_like(params, 1.0)
    dp.add(update)
    assert all(v.dtype == dtype for v in dp_mean(dp, 1.0, 10, np.random.default_rng(0)).values())
    plain = RunningSum.zeros_like(params, None)
    plain.add(update, 3.0)
    assert all(v.dtype == dtype for v in weighted_mean(plain).values())
    for opt in ("fedavg", "fedavgm", "fedadam"):
        algo = dp_fedavg.DPFedAvg(num_clients=100, clients_per_round=10, clip_norm=1.0,
                                  server_optimizer=dp_fedavg.ServerOptimizer(opt))
        state = dp_fedavg.init(algo, params)
        contribs = [dp_fedavg.Contribution(str(i), update) for i in range(3)]
        new, _ = dp_fedavg.apply(algo, state, contribs, np.random.default_rng(0))
        assert all(new.params[k].dtype == dtype for k in params), opt
        assert all(v.dtype == dtype for m in new.opt_state.values() for v in m.values()), opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_l2_norm_is_float64_exact(dtype):
    rng = np.random.default_rng(5)
    for _ in range(50):
        update = random_update(rng, dtype, scale=10.0 ** rng.uniform(-3, 3))
        assert global_l2_norm(update) == pytest.approx(exact_norm(update), rel=1e-13)
