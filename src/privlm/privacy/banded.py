"""Banded Toeplitz strategy matrices for matrix-factorization DP (DP-FTRL, BandMF).

The rounds' clipped sums ``x_1..x_T`` are released as ``x + C^-1 z`` with ``z ~ N(0, s^2 I)``
per round and coordinate: post-processing of ``Cx + z``, a Gaussian mechanism whose
sensitivity is that of ``C`` under the participation schema (Denisov et al. 2022;
Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization"). Here ``C`` is lower
triangular, **banded** (``b`` diagonals) and **Toeplitz**: ``C[t, t-j] = c_j`` for ``0 <= j < b``,
with ``||c||_2 = 1`` (every full column has norm 1). Toeplitz costs little against a general
banded C (McKenna 2024, "Scaling up the Banded Matrix Factorization Mechanism") and makes every
quantity below a short recurrence:

* the noise ``y = C^-1 z`` of round t is ``(z_t - sum_j c_j y_{t-j}) / c_0``: the mechanism keeps
  the last ``b - 1`` draws (``O(b x model)``);
* the error of the workload ``A`` (the model is a prefix sum of the released updates, or a
  momentum-weighted one) is ``||A C^-1||_F^2``: ``A C^-1`` is lower triangular Toeplitz, whose
  coefficients are an IIR filter's impulse response (``scipy.signal.lfilter``);
* sensitivity: columns ``>= b`` apart have disjoint supports, so when a user takes part at
  most ``k`` times, at least ``b`` rounds apart, one user's contribution to ``Cx`` has squared
  norm at most the sum of the squared norms of their columns (vectors of norm <= the clip C).
  After ``t`` rounds (rows 1..t released) column ``i`` has squared norm ``sum_{j < t-i+1} c_j^2``,
  largest for the earliest columns, so the worst pattern takes rounds 1, 1+b, 1+2b, ...; the
  squared sensitivity grows by exactly ``c_{(t-1) mod b}^2`` in round t while ``t <= k b``, and
  not at all after (:func:`sensitivity_increment`).

With ``b = 1`` (``c = [1]``) this is DP-FedAvg's independent noise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize, signal

WORKLOADS = ("prefix", "momentum")


def workload_denominator(workload: str, momentum: float = 0.0) -> np.ndarray:
    """The workload's generating function as ``1 / a(x)``: prefix sums ``1/(1-x)``; server momentum
    beta (heavy ball: the model moves by ``sum_s beta^(t-s)`` of each update) ``1/((1-x)(1-beta x))``."""
    if workload == "prefix":
        return np.array([1.0, -1.0])
    if workload == "momentum":
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return np.convolve([1.0, -1.0], [1.0, -momentum])
    raise ValueError(f"unknown workload {workload!r} (use one of {WORKLOADS})")


def _impulse(denominator: np.ndarray, rounds: int) -> np.ndarray:
    unit = np.zeros(rounds)
    unit[0] = 1.0
    return signal.lfilter([1.0], denominator, unit)


def workload_error(coefficients: np.ndarray, rounds: int, workload: str = "prefix", momentum: float = 0.0) -> float:
    """``||A C^-1||_F^2 * ||c||^2``: the total squared error of the T released model states per unit
    of noise variance, for sensitivity 1 per participation (scale-free in ``c``)."""
    c = np.asarray(coefficients, dtype=np.float64)
    x = _impulse(np.convolve(workload_denominator(workload, momentum), c), rounds)
    weights = np.arange(rounds, 0, -1, dtype=np.float64)  # coefficient k appears T - k times
    return float(np.dot(weights, x * x) * np.dot(c, c))


def sqrt_coefficients(bands: int) -> np.ndarray:
    """The first ``b`` coefficients of ``(1-x)^(-1/2)`` (the optimal Toeplitz factor of prefix sums,
    Fichtenberger et al. 2023), normalised to unit norm: the optimizer's starting point."""
    c = np.ones(bands)
    for j in range(1, bands):
        c[j] = c[j - 1] * (2 * j - 1) / (2 * j)
    return c / np.linalg.norm(c)


@lru_cache(maxsize=32)
def optimal_banded_toeplitz(rounds: int, bands: int, workload: str = "prefix", momentum: float = 0.0) -> tuple[float, ...]:
    """The banded Toeplitz ``c`` (``len(c) == bands``, ``c_0 > 0``, ``||c|| = 1``) minimising
    :func:`workload_error` for ``rounds`` rounds; L-BFGS over ``c_1..c_{b-1}`` with ``c_0 = 1``
    (the error is scale-free), from :func:`sqrt_coefficients`. Deterministic: a function of its
    public arguments only."""
    if not (isinstance(bands, int) and 1 <= bands):
        raise ValueError(f"bands must be an integer >= 1, got {bands!r}")
    if not (isinstance(rounds, int) and bands <= rounds):
        raise ValueError(f"bands ({bands}) cannot exceed the rounds ({rounds})")
    if bands == 1:
        return (1.0,)
    start = sqrt_coefficients(bands)
    start = start / start[0]

    def loss(tail: np.ndarray) -> float:
        value = workload_error(np.concatenate([[1.0], tail]), rounds, workload, momentum)
        return math.log(value) if math.isfinite(value) and value > 0 else 1e6

    best = optimize.minimize(loss, start[1:], method="L-BFGS-B", options={"maxiter": 500})
    tail = best.x if best.fun <= loss(start[1:]) else start[1:]
    c = np.concatenate([[1.0], tail])
    c = c / np.linalg.norm(c)
    return tuple(float(v) for v in c)


def coefficients_problem(coefficients: list[float] | tuple[float, ...]) -> str | None:
    """Why user-given coefficients cannot be a strategy, or None: they must have ``c_0 > 0``, unit
    norm (to 1e-12: the accounting assumes columns of norm <= 1) and a stable inverse (every root
    of ``c(x)`` outside the unit circle; else ``C^-1``, and the noise, grow geometrically)."""
    c = np.asarray(coefficients, dtype=np.float64)
    if not (c.size and np.all(np.isfinite(c)) and c[0] > 0):
        return "need finite values with c_0 > 0"
    if abs(math.fsum(float(v) * float(v) for v in c) - 1.0) > 1e-12:
        return f"need unit norm (the sum of squares is {float(np.dot(c, c)):.12g}; divide by its square root)"
    roots = np.roots(c[::-1]) if np.count_nonzero(c[1:]) else np.array([])
    if roots.size and np.min(np.abs(roots)) <= 1.0 + 1e-9:
        return (f"C^-1 is unstable (a root of c(x) has |x| = {np.min(np.abs(roots)):.4g} <= 1): its noise "
                "would grow without bound")
    return None


def strategy_matrix(coefficients: tuple[float, ...] | np.ndarray, rounds: int) -> np.ndarray:
    """The explicit ``T x T`` matrix C (for tests and comparisons; the mechanism never builds it)."""
    c = np.asarray(coefficients, dtype=np.float64)
    m = np.zeros((rounds, rounds))
    for j, v in enumerate(c):
        m += v * np.eye(rounds, k=-j)
    return m


def max_participations(rounds: int, bands: int, limit: int | None) -> int:
    """k: the most a user can take part in ``rounds`` rounds ``bands`` apart, capped by ``limit``."""
    most = -(-rounds // bands)
    return most if limit is None else min(limit, most)


def sensitivity_increment(coefficients: tuple[float, ...], round_index: int, participations: int) -> float:
    """How much round ``round_index`` (1-based) adds to the squared sensitivity of the released
    prefix, for sensitivity 1 per participation: ``c_{(t-1) mod b}^2`` while ``t <= k b``, else 0
    (see the module docstring; :func:`sensitivity_squared` sums these)."""
    b = len(coefficients)
    if round_index > participations * b:
        return 0.0
    return coefficients[(round_index - 1) % b] ** 2


def sensitivity_squared(coefficients: tuple[float, ...], rounds: int, participations: int) -> float:
    """Squared sensitivity of rows 1..``rounds`` of C: at most ``participations`` columns, >= b apart."""
    return float(sum(sensitivity_increment(coefficients, t, participations) for t in range(1, rounds + 1)))
