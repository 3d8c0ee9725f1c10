"""Server-side aggregation: validate, clip, stream-sum, noise, divide.

This is the privacy-critical half of a DP-FedAvg round. Memory is O(model):
updates are folded into one running sum as they arrive and then dropped
(FedJAX: "to avoid loading all the client outputs into memory").

User-level DP (``DPSumQuery``): each accepted update is clipped to L2 norm C
over all tensors together, the clipped updates are summed, one Gaussian draw
N(0, (zC)^2 I) is added to the sum, and the result is divided by the
*expected* number of clients q*N, not by the number that showed up. With the
fixed denominator the mean's sensitivity to one user is C/(qN) whatever the
sample was, so dropped or rejected clients never change the guarantee.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from privlm.privacy.mechanism import add_gaussian_noise, clip_factor, global_l2_norm

Params = dict[str, torch.Tensor]

# An update with more than this many times the model's elements, or a single
# value beyond this magnitude, is rejected as absurd before any arithmetic.
MAX_ABS_VALUE = 1e6
# Largest FedAvg weight (a client's token count) accepted by validate_weight.
MAX_WEIGHT = 1e12


def validate_update(update: object, reference: Mapping[str, torch.Tensor], values: bool = True) -> str | None:
    """Return why ``update`` is malformed, or ``None`` if it may be aggregated.

    Checks: a mapping of exactly the reference's names; each a dense tensor with
    the reference's shape, dtype and device; all values finite and of sane
    magnitude (``values=False``: the structure only). Never raises, whatever ``update``
    is (names a client sent are shown by ``repr``, cut short).
    """
    if not isinstance(update, Mapping):
        return f"update is a {type(update).__name__}, not a mapping of tensors"
    missing = set(reference) - set(update)
    extra = set(update) - set(reference)
    if missing:
        return f"missing tensors {_names(missing)}"
    if extra:
        return f"unexpected tensors {_names(extra)}"
    for name, ref in reference.items():
        t = update[name]
        if not isinstance(t, torch.Tensor):
            return f"{name}: {type(t).__name__} is not a tensor"
        if t.layout != torch.strided:
            return f"{name}: layout {t.layout} is not a dense (strided) tensor"
        if t.device != ref.device:
            return f"{name}: device {t.device} != expected {ref.device}"
        if t.shape != ref.shape:
            return f"{name}: shape {tuple(t.shape)} != expected {tuple(ref.shape)}"
        if t.dtype != ref.dtype:
            return f"{name}: dtype {t.dtype} != expected {ref.dtype}"
    if not values:
        return None
    # Values: one fused max-|x| per tensor and one host sync for the whole update (NaN and
    # Inf propagate into the max); only a bad update is searched tensor by tensor for a name.
    tensors = [update[name].detach() for name in reference if update[name].numel()]
    if tensors and not _values_ok(float(torch.stack(torch._foreach_norm(tensors, math.inf)).amax())):
        return _value_problem(update, reference)
    return None


def _value_problem(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor holding NaN, Inf or a value beyond :data:`MAX_ABS_VALUE`, or None."""
    for name in reference:
        t = update[name]
        if t.numel():
            amax = float(t.detach().abs().amax())
            if not math.isfinite(amax):
                return f"{name}: contains NaN or Inf"
            if amax > MAX_ABS_VALUE:
                return f"{name}: values beyond {MAX_ABS_VALUE:g} in magnitude"
    return None


def validate_and_norm(update: object, reference: Mapping[str, torch.Tensor]) -> tuple[str | None, float]:
    """:func:`validate_update` and the update's float64 L2 norm, in one pass over its values.

    Every ``|x| <= ||x||_2``, so a finite norm of at most :data:`MAX_ABS_VALUE` proves the values
    sane without the max-|x| pass; only an update whose norm is not is searched value by value
    (the same verdicts as :func:`validate_update`). Returns (reason or None, norm).
    """
    reason = validate_update(update, reference, values=False)
    if reason is not None:
        return reason, math.nan
    assert isinstance(update, Mapping)
    norm = global_l2_norm(update)
    if not (math.isfinite(norm) and norm <= MAX_ABS_VALUE):
        return _value_problem(update, reference), norm
    return None, norm


def _values_ok(amax: float) -> bool:
    return math.isfinite(amax) and amax <= MAX_ABS_VALUE


def validate_weight(weight: object) -> str | None:
    """Return why a client's FedAvg ``weight`` is malformed, or ``None``.

    A weight (its token count) must be a real number, finite, >= 0 and at most
    :data:`MAX_WEIGHT`: a NaN, infinite or negative weight would poison or
    cancel the weighted mean of the non-private mode. (Under DP every accepted
    update has weight 1 and the client's weight is not used.)
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return f"weight is a {type(weight).__name__}, not a number"
    try:
        w = float(weight)
    except OverflowError:  # an int beyond the float range
        w = math.inf
    if not math.isfinite(w):
        return "weight is NaN or infinite"
    if w < 0:
        return f"weight {w:g} is negative"
    if w > MAX_WEIGHT:
        return f"weight {w:g} is beyond {MAX_WEIGHT:g}"
    return None


def _names(keys: set) -> str:
    """Up to three of ``keys`` for a message; keys of any type, sorted by repr."""
    shown = sorted(repr(k)[:40] for k in keys)
    return f"[{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}]"


@dataclass
class RunningSum:
    """Streaming (optionally clipped, optionally weighted) sum of updates.

    Under DP (``clip_norm`` set) the sum is kept in float64: adding or removing one client
    then changes it by that client's clipped update (norm <= C (1 - 1e-6)) up to float64
    rounding, at most ~2^-52 k^2 C for k clients even in the worst case, which the clipping
    margin covers for k up to ~5e4 per round. The released mean is rounded back to
    ``dtypes``, the parameters' dtypes. Non-private sums stay in the parameters' dtypes.
    """

    total: Params
    clip_norm: float | None  # None: no clipping (non-private FedAvg)
    count: int = 0
    weight: float = 0.0
    clipped: int = 0  # how many updates had norm > clip_norm
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # the means' (the parameters')
    ids: list[str] = field(default_factory=list)  # who was summed, where the aggregator knows it

    def __post_init__(self) -> None:
        self.dtypes = {k: self.dtypes.get(k, v.dtype) for k, v in self.total.items()}

    @classmethod
    def zeros_like(cls, params: Mapping[str, torch.Tensor], clip_norm: float | None) -> RunningSum:
        dtype = torch.float64 if clip_norm is not None else None  # None: the parameter's
        return cls({k: torch.zeros_like(v, dtype=dtype) for k, v in params.items()}, clip_norm,
                   dtypes={k: v.dtype for k, v in params.items()})

    def add(self, update: Mapping[str, torch.Tensor], weight: float = 1.0) -> float:
        """Fold one validated update in; returns its L2 norm before clipping.

        Clipping is the scalar ``min(1, C/norm)`` applied inside the accumulation
        (``total += factor * update``), so no clipped copy is materialised.
        """
        norm = global_l2_norm(update)
        factor = weight
        if self.clip_norm is not None:
            factor *= clip_factor(norm, self.clip_norm)
        self.add_scaled(update, factor, weight, self.clip_norm is not None and norm > self.clip_norm, norm)
        return norm

    def add_scaled(self, update: Mapping[str, torch.Tensor], factor: float, weight: float, clipped: bool,
                   norm: float | None = None, client_id: str | None = None) -> None:
        """``total += factor * update`` for an update already validated; under DP ``factor`` is its
        clip scale ``min(1, C'/norm)`` (see :meth:`add`), and that it clips is checked here:
        ``factor * norm <= C`` and weight 1, for the ``norm`` the preprocessing measured."""
        if self.clip_norm is not None and not (norm is not None and weight == 1.0 and 0 <= factor <= 1
                                               and factor * norm <= self.clip_norm):
            raise ValueError(f"an update scaled by {factor!r} (norm {norm!r}, weight {weight!r}) is not "
                             f"clipped to C = {self.clip_norm}")
        for k, v in update.items():  # computed in the total's dtype (float64 under DP)
            self.total[k].add_(v, alpha=factor)
        self.count += 1
        self.weight += weight
        self.clipped += clipped
        if client_id is not None:
            self.ids.append(client_id)


def dp_mean(
    clipped_sum: RunningSum,
    noise_multiplier: float,
    expected_clients: float,
    generator: np.random.Generator,
) -> Params:
    """``(sum of clipped updates + N(0, (zC)^2 I)) / (q N)``: the Gaussian mechanism.

    Refuses to run on an unclipped sum: noise calibrated to C means nothing
    if contributions were not bounded by C.
    """
    if clipped_sum.clip_norm is None:
        raise ValueError("DP mean requires a clipped sum (clip_norm is None)")
    if not expected_clients > 0:
        raise ValueError("expected_clients must be > 0")
    std = noise_multiplier * clipped_sum.clip_norm
    noised = add_gaussian_noise(clipped_sum.total, std, generator)  # float64, like the sum
    return {k: (v / expected_clients).to(clipped_sum.dtypes[k]) for k, v in noised.items()}


def dp_fraction_at_most_clip(
    running: RunningSum,
    count_stddev: float,
    expected_clients: float,
    generator: np.random.Generator,
) -> float:
    """The noised fraction of this round's updates whose norm was at most C (adaptive clipping).

    Andrew et al. 2021: each accepted update contributes ``b - 1/2`` with ``b = [norm <= C]``,
    so one user changes the sum by at most 1/2; one Gaussian draw of std ``count_stddev`` is
    added, and the result is divided by the expected count q*N and shifted back by 1/2.
    This is a Gaussian mechanism of multiplier ``2 * count_stddev``; its cost is paid by the
    raised update noise (see :class:`privlm.federated.dp_fedavg.AdaptiveClipping`).
    """
    if running.clip_norm is None:
        raise ValueError("the clipped-count query needs a clipped sum")
    if not (count_stddev > 0 and math.isfinite(count_stddev)):
        raise ValueError(f"count noise std must be finite and > 0, got {count_stddev}")
    centered = (running.count - running.clipped) - running.count / 2.0
    return (centered + count_stddev * float(generator.standard_normal())) / expected_clients + 0.5


def weighted_mean(running: RunningSum) -> Params:
    """Plain FedAvg mean (non-private): sum of weighted updates / total weight."""
    if running.weight <= 0:
        return {k: torch.zeros_like(v, dtype=running.dtypes[k]) for k, v in running.total.items()}
    return {k: (v / running.weight).to(running.dtypes[k]) for k, v in running.total.items()}
