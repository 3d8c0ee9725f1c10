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

# PLD grid step for privacy-loss values: dp-accounting's default. A coarser grid is
# still an upper bound but not a tight one where DP-FL lives: 1e-3 over-states epsilon
# by 2.45% at q = 0.002, z = 1.3, T = 5,000, delta = 1e-7 (tests/test_accounting.py).
# The cost of the finer grid is paid once per release, not per round (BudgetCheck).
PLD_DISCRETIZATION = 1e-4
# Calibration searches on this coarser grid first (fast), then refines on the fine one.
COARSE_PLD_DISCRETIZATION = 1e-3

# Calibration never goes below this noise multiplier (PLD discretisation blows up near 0),
# nor above the maximum.
MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1e4
# Bounds on the accountant's work: its PLD arrays grow as the loss spread, ~sqrt(T)/z grid steps.
MAX_ROUNDS = 10_000_000
MAX_PLD_POINTS = 3e8  # ~5 GB for one complex FFT array: beyond it, refuse rather than exhaust memory


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
            self._pld = self._pld.compose(base.self_compose(count))  # type: ignore[has-type]
            return None
        return super()._maybe_compose(event, count, do_compose)


def _fresh(kind: AccountantKind, interval: float = PLD_DISCRETIZATION) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        return _PLDAccountant(value_discretization_interval=interval)
    if kind == "rdp":
        return rdp.RdpAccountant()
    raise ValueError(f"unknown accountant {kind!r} (use 'pld' or 'rdp')")


def accounting_problem(sampling_rate: float, noise_multiplier: float, rounds: int) -> tuple[str, str] | None:
    """Why (q, z, T) cannot be accounted here: ``(which of the three, why)``, or None.

    Values must be finite and in range, and the work bounded: the composed PLD spans
    about 20 sqrt(T) / z in privacy loss (plus one round's range), on a 1e-4 grid.
    """
    q, z, T = sampling_rate, noise_multiplier, rounds
    if not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q <= 1):
        return "sampling_rate", f"{q!r} is not a number in (0, 1]"
    if not (isinstance(z, (int, float)) and math.isfinite(z) and MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER):
        return "noise_multiplier", (f"{z!r} is outside [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}] "
                                    "(below it epsilon is in the hundreds and the accountant's work explodes)")
    if not (isinstance(T, int) and 0 <= T <= MAX_ROUNDS):
        return "rounds", f"{T!r} is outside [0, {MAX_ROUNDS:,}]"
    points = (20 * math.sqrt(T) / z + 1 / (2 * z * z) + 20 / z) / PLD_DISCRETIZATION
    if points > MAX_PLD_POINTS:
        return "rounds", (f"{T:,} rounds at z={z:g} would need ~{points:.1e} accountant grid points (at most "
                          f"{MAX_PLD_POINTS:.0e}: about 5 GB); use fewer rounds or more noise")
    return None


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
    events: Iterable[dp_accounting.DpEvent] | Ledger, delta: float, kind: AccountantKind = "pld",
    _interval: float = PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of composing ``events`` (a ledger or any events).

    A ledger charged to participation groups (banded MF with cyclic sampling: each user
    belongs to one group) has one account per group; its epsilon is the largest group's.
    """
    if isinstance(events, Ledger) and (groups := events.groups()):
        return max(epsilon_for(events.for_group(g), delta, kind, _interval) for g in groups)
    events = events.events if isinstance(events, Ledger) else list(events)
    if not events:
        return 0.0
    composed = compose_events(events)
    try:
        key = tuple(composed.events)  # frozen attrs records: hashable, equal iff the same events
        hash(key)
    except TypeError:
        return _compose_epsilon(composed, delta, kind, _interval)
    return _cached_epsilon(key, delta, kind, _interval)


def ledger_epsilon(ledger: Ledger, delta: float, kind: AccountantKind = "pld") -> tuple[float, dict[str, float]]:
    """(epsilon, per-silo epsilons) of a run's ledger: at example level each silo's records have
    their own account and the run's epsilon is the largest silo's; otherwise ``epsilon_for``."""
    silos = ledger.silos()
    if silos:
        per = {s: epsilon_for(ledger.for_silo(s), delta, kind) for s in silos}
        return max(per.values()), per
    return epsilon_for(ledger, delta, kind), {}


@functools.lru_cache(maxsize=64)  # silos running one mechanism ask for the same ledger's epsilon
def _cached_epsilon(runs: tuple, delta: float, kind: AccountantKind, interval: float) -> float:
    return _compose_epsilon(dp_accounting.ComposedDpEvent(list(runs)), delta, kind, interval)


def _compose_epsilon(composed: dp_accounting.DpEvent, delta: float, kind: AccountantKind, interval: float) -> float:
    acc = _fresh(kind, interval)
    acc.compose(composed)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    kind: AccountantKind = "pld",
    _interval: float = PLD_DISCRETIZATION,
) -> float:
    """Epsilon of ``rounds`` DP-FedAvg rounds at (q, z).

    Computed exactly as a run's ledger of ``rounds`` such rounds is (same
    composed event), so calibration, budget checks and reports agree to the bit.
    """
    if rounds <= 0:
        return 0.0
    return epsilon_for([round_event(sampling_rate, noise_multiplier)] * rounds, delta, kind, _interval)


@functools.lru_cache(maxsize=128)  # a pure function of public numbers; a resume or a second build asks again
def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    kind: AccountantKind = "pld",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier ``z`` whose ``rounds`` rounds stay within ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method over z) on the coarse
    PLD grid (cheap), then searches the multiples of ``tol`` near that answer with the
    very computation a run's ledger gets: the returned z is a multiple of ``tol`` just
    checked to meet the target there, and the smallest one if epsilon decreases in z.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError("target_epsilon must be a finite number > 0")
    if not (math.isfinite(tol) and 1e-9 <= tol <= MIN_NOISE_MULTIPLIER):
        raise ValueError(f"tol must be in [1e-9, {MIN_NOISE_MULTIPLIER}]")
    fine = PLD_DISCRETIZATION
    coarse = COARSE_PLD_DISCRETIZATION if kind == "pld" else fine

    def eps(z: float, interval: float = fine) -> float:
        return epsilon(sampling_rate, z, rounds, delta, kind, interval)

    def brent(lo: float, hi: float, interval: float) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _fresh(kind, interval),
            lambda z: dp_accounting.SelfComposedDpEvent(round_event(sampling_rate, z), rounds),
            target_epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol / 10))

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi) by doubling/halving from z = 1
    # on the coarse grid. (Very small z makes PLD discretisation explode, hence the floor.)
    lo, hi = 1.0, 1.0
    if eps(hi, coarse) > target_epsilon:
        while eps(hi, coarse) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > MAX_NOISE_MULTIPLIER:
                raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} meets the target epsilon")
    else:
        while eps(lo, coarse) <= target_epsilon:
            if lo <= MIN_NOISE_MULTIPLIER:
                break
            hi, lo = lo, max(lo / 2, MIN_NOISE_MULTIPLIER)
    if eps(lo, coarse) <= target_epsilon:  # even the floor meets the target
        z = MIN_NOISE_MULTIPLIER
    else:
        z = brent(lo, hi, coarse)
    # Refine on the multiples of tol with the fine grid (the ledger's computation): the smallest
    # k with eps(k * tol) <= target. The coarse grid is pessimistic, so the answer is usually the
    # coarse one rounded up, or one step below it: two fine evaluations (each ~1 s at small z),
    # where Brent's method on the fine grid took about nine. Galloping then bisection otherwise.
    def at(k: int) -> float:
        return round(k * tol, 12)

    checked: dict[int, float] = {}

    def meets(k: int) -> bool:
        if k not in checked:
            checked[k] = eps(at(k))
        return checked[k] <= target_epsilon

    kmin = math.ceil(MIN_NOISE_MULTIPLIER / tol - 1e-9)
    hi, failed = max(math.ceil(z / tol - 1e-9), kmin), kmin - 1  # failed: the largest k known to miss
    while not meets(hi):  # (the coarse grid is not guaranteed to lie above)
        failed, hi = hi, max(hi + 1, math.ceil(hi * 1.05))
        if at(hi) > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} meets the target epsilon")
    lo, step = max(hi - 1, failed), 1
    while lo > kmin and meets(lo):
        hi, step = lo, step * 2
        lo = max(hi - step, kmin, failed)
    if lo <= kmin and meets(kmin):
        return at(kmin)  # even the floor meets the target
    while hi - lo > 1:  # meets(hi) and not meets(lo)
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return at(hi)  # exactly the value checked, with the ledger's computation


class BudgetCheck:
    """Whether ``prefix`` plus ``n`` more copies of ``event`` stays within ``budget``.

    The run's per-round check without a per-round accountant call: the largest
    ``n`` (up to ``horizon``) with ``epsilon_for(prefix + [event] * n) <= budget``
    is found once, by bisection on that very computation, and each round then
    compares its count to it. Sound because composing one more mechanism never
    lowers epsilon (checked on a grid in tests/test_accounting.py). Built anew
    whenever the ledger changes other than by appending ``event``.
    """

    def __init__(self, prefix: list[dp_accounting.DpEvent], event: dp_accounting.DpEvent, delta: float,
                 kind: AccountantKind, budget: float | None, horizon: int) -> None:
        self.prefix, self.event, self.delta, self.kind = list(prefix), event, delta, kind
        self.budget, self.horizon = budget, max(int(horizon), 0)
        self._max: int | None = None if budget is not None else self.horizon
        self.evaluations = 0

    def epsilon(self, n: int) -> float:
        """The exact epsilon of ``prefix`` plus ``n`` copies of ``event``."""
        self.evaluations += 1
        return epsilon_for([*self.prefix, *[self.event] * n], self.delta, self.kind)

    @property
    def max_more(self) -> int:
        """The most further events within the budget (at most ``horizon``)."""
        if self._max is None:
            assert self.budget is not None
            lo, hi = 0, self.horizon  # invariant: lo fits; answer in [lo, hi]
            if self.horizon and self.epsilon(self.horizon) <= self.budget:
                lo = self.horizon
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.epsilon(mid) <= self.budget:
                    lo = mid
                else:
                    hi = mid - 1
            self._max = lo
        return self._max

    def allows(self, n: int) -> bool:
        """Whether ``n`` more events fit in the budget."""
        return n <= self.max_more
