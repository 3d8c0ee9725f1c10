"""Epsilon from a ledger, noise calibration, and the budget check (dp-accounting).

The only place in privlm where events become numbers. Two accountants:

* ``"pld"`` (default): privacy loss distributions (Meiser & Mohammed 2018;
  Koskela et al. 2020), tight up to discretisation, pessimistic rounding.
* ``"rdp"``: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), the
  accountant of McMahan et al. 2018; looser, reproduces that paper's numbers.

Both use the add-or-remove-one neighbouring relation: the unit (a user, for
user-level DP-FedAvg) is present or absent, which is what Poisson sampling with
a fixed denominator protects.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

from privlm.privacy.ledger import Ledger, compose_events

AccountantKind = Literal["pld", "rdp"]

# PLD grid step for privacy-loss values. dp-accounting's PLDs are pessimistic
# (upper bounds) at any step; 1e-3 instead of the library's 1e-4 is ~10x faster
# and moves epsilon by < 1e-5 at the settings privlm uses (see tests).
PLD_DISCRETIZATION = 1e-3

# Calibration never goes below this noise multiplier (PLD discretisation blows up near 0).
MIN_NOISE_MULTIPLIER = 0.05


@functools.lru_cache(maxsize=4)  # a run uses one (z, q); calibration tries each z once
def _subsampled_gaussian_pld(
    noise_multiplier: float, sampling_rate: float, interval: float, relation
) -> pld.privacy_loss_distribution.PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian round's PLD, built once per (z, q).

    Building it is most of an epsilon's cost (~0.1 s of pure Python: a grid of
    inverse privacy losses); a run asks for the same one every round. PLDs are
    immutable (compose/self_compose return new ones), so sharing is safe.
    """
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=interval,
        sampling_prob=sampling_rate, neighboring_relation=relation,
    )


class _PLDAccountant(pld.PLDAccountant):
    """dp-accounting's PLD accountant, with the base PLD of a DP-FedAvg round cached.

    It composes exactly what ``PLDAccountant`` composes (the same library call
    with the same arguments, then ``self_compose(count)``), so epsilon is equal
    to the bit; ``tests/test_accounting.py`` checks that against the stock class.
    Every other event goes to the stock code. (dp-accounting is pinned exactly.)
    """

    def _maybe_compose(self, event, count, do_compose):
        if (do_compose and isinstance(event, dp_accounting.PoissonSampledDpEvent)
                and isinstance(event.event, dp_accounting.GaussianDpEvent)
                and event.sampling_probability != 0 and event.event.noise_multiplier != 0):
            base = _subsampled_gaussian_pld(event.event.noise_multiplier, event.sampling_probability,
                                            self._value_discretization_interval, self.neighboring_relation)
            self._pld = self._pld.compose(base.self_compose(count))
            return None
        return super()._maybe_compose(event, count, do_compose)


def _fresh(kind: AccountantKind) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return _PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    if kind == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"unknown accountant {kind!r} (use 'pld' or 'rdp')")


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The event of one DP-FedAvg round: Poisson(q)-sampled Gaussian(z) on the clipped sum."""
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def default_delta(num_units: int) -> float:
    """``1 / N**1.1`` (McMahan et al. 2018): below 1/N, as delta must be."""
    if num_units < 1:
        raise ValueError("need at least one unit to protect")
    return 1.0 / num_units**1.1


def epsilon_for(
    events: Iterable[dp_accounting.DpEvent] | Ledger, delta: float, kind: AccountantKind = "pld"
) -> float:
    """Epsilon at ``delta`` of composing ``events`` (a ledger or any events)."""
    events = events.events if isinstance(events, Ledger) else list(events)
    if not events:
        return 0.0
    acc = _fresh(kind)
    acc.compose(compose_events(events))
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    kind: AccountantKind = "pld",
) -> float:
    """Epsilon of ``rounds`` DP-FedAvg rounds at (q, z).

    Computed exactly as a run's ledger of ``rounds`` such rounds is (same
    composed event), so calibration, budget checks and reports agree to the bit.
    """
    if rounds <= 0:
        return 0.0
    return epsilon_for([round_event(sampling_rate, noise_multiplier)] * rounds, delta, kind)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    kind: AccountantKind = "pld",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier ``z`` whose ``rounds`` rounds stay within ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over z).
    The returned z is rounded *up* to ``tol`` and checked, so it always meets
    the target.
    """
    if not target_epsilon > 0:
        raise ValueError("target_epsilon must be > 0")

    def eps(z: float) -> float:
        return epsilon(sampling_rate, z, rounds, delta, kind)

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi) by doubling/halving from z = 1.
    # (Very small z makes PLD discretisation explode, hence the floor.)
    lo, hi = 1.0, 1.0
    if eps(hi) > target_epsilon:
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise ValueError("no noise multiplier up to 1e4 meets the target epsilon")
    else:
        while eps(lo) <= target_epsilon:
            if lo <= MIN_NOISE_MULTIPLIER:
                return MIN_NOISE_MULTIPLIER
            hi, lo = lo, max(lo / 2, MIN_NOISE_MULTIPLIER)
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _fresh(kind),
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(sampling_rate, z), rounds),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=tol / 10,
    )
    z = round(math.ceil(float(z) / tol) * tol, 12)
    while epsilon(sampling_rate, z, rounds, delta, kind) > target_epsilon:
        z = round(z + tol, 12)
    return z  # exactly the value just checked
