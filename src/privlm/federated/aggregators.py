"""Aggregators: where a round's preprocessed updates go before the mechanism releases them.

* :class:`StreamingSum` -- today's: each update is folded into one running sum as it arrives
  and dropped (O(model) memory however many clients a round has);
* :class:`Buffered` -- keeps every preprocessed update of the round (O(clients x model)), for
  statistics that are not a sum (robust aggregation); its sum is the streaming sum, to the bit;
* :class:`PreSummed` -- the sum was computed elsewhere (secure aggregation: the server only
  ever sees the sum of the masked, clipped updates); it takes no single update;
* robust aggregators, non-private runs only (defences against poisoning, issue #24):
  :class:`CoordinateMedian` (Yin et al. 2018), :class:`TrimmedMean` (Yin et al. 2018) and
  :class:`Krum` (Blanchard et al. 2017; multi-Krum with ``selected > 1``). Each keeps the round's
  updates (O(clients x model)) and replaces their weighted mean by its statistic of the
  unweighted per-client updates (each after the mechanism's norm bound, if any).

All end in the same :class:`~privlm.federated.aggregation.RunningSum` that a mechanism's
``release`` reads (clip norm, counts, float64 total under DP). A robust statistic is handed on
as a sum of weight 1, so the non-private release (total / weight) returns it unchanged.

Why the robust ones are refused under DP: DP-FedAvg's noise is calibrated to the L2 sensitivity
of the *sum* of clipped updates, C (one user adds or removes one vector of norm <= C). A median,
trimmed mean or Krum choice of clipped updates has no such bound the noise is scaled to: one
user can move every coordinate's median to the next order statistic (up to 2C per coordinate,
2C sqrt(d) in L2), or change which update Krum picks. Under DP the defences are the clip norm and
the noise themselves (Sun et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from privlm.federated.aggregation import RunningSum, validate_update
from privlm.mechanisms.base import Preprocessed
from privlm.privacy.mechanism import global_l2_norm


class Aggregator(Protocol):
    def add(self, record: Preprocessed) -> None: ...

    def result(self) -> RunningSum: ...


class StreamingSum:
    """``total += factor * update``, one update at a time (float64 under DP)."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None) -> None:
        self.sum = RunningSum.zeros_like(like, clip_norm)

    def add(self, record: Preprocessed) -> None:
        self.sum.add_scaled(record.update, record.factor, record.weight, record.clipped, record.norm, record.client_id)

    def result(self) -> RunningSum:
        return self.sum


class Buffered:
    """Every preprocessed update of the round, in arrival order; ``result`` is their sum."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None) -> None:
        self.like, self.clip_norm = like, clip_norm
        self.records: list[Preprocessed] = []

    def add(self, record: Preprocessed) -> None:
        self.records.append(record)

    def result(self) -> RunningSum:
        total = StreamingSum(self.like, self.clip_norm)
        for r in self.records:
            total.add(r)
        return total.result()


class PreSummed:
    """A sum computed elsewhere (secure aggregation): :meth:`set_sum` once; :meth:`add` refuses."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None) -> None:
        self.sum: RunningSum | None = None
        self.like, self.clip_norm = like, clip_norm

    def add(self, record: Preprocessed) -> None:
        raise TypeError("a pre-summed aggregate takes no single update (the server only sees the sum)")

    def set_sum(self, total: Mapping[str, torch.Tensor], count: int, clipped: int, clip_norm: float | None) -> None:
        """The round's sum from the secure-aggregation protocol, with what the clients clipped to.

        Checked: the clients' C is this round's, the tensors are the parameters' (names, shapes,
        finite values), 0 <= clipped <= count, and the sum's norm is at most count * C. What it
        cannot check -- that each client ran the mechanism's own ``preprocess`` -- is the protocol's
        to attest (issue #23).
        """
        if self.sum is not None:
            raise ValueError("the round's sum was already set")
        if clip_norm != self.clip_norm:
            raise ValueError(f"the clients clipped to {clip_norm!r}, not to this round's C = {self.clip_norm!r}")
        if isinstance(count, bool) or not isinstance(count, int) or not isinstance(clipped, int) \
                or not 0 <= clipped <= count:
            raise ValueError(f"counts {count!r} / {clipped!r} clipped are not 0 <= clipped <= count")
        like = {k: v.to(torch.float64) for k, v in self.like.items()}
        reason = validate_update({k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v
                                  for k, v in total.items()}, like) if isinstance(total, Mapping) else "not a mapping"
        if reason is not None:
            raise ValueError(f"the pre-summed aggregate is malformed: {reason}")
        if self.clip_norm is not None and global_l2_norm(total) > count * self.clip_norm:
            raise ValueError("the pre-summed aggregate's norm exceeds count * C: it was not clipped")
        running = RunningSum.zeros_like(self.like, self.clip_norm)
        for k, v in total.items():
            running.total[k].add_(v.to(running.total[k].dtype))
        running.count, running.weight, running.clipped = count, float(count), clipped
        self.sum = running

    def result(self) -> RunningSum:
        if self.sum is None:
            raise ValueError("no sum was received for this round")
        return self.sum


class _Robust(Buffered):
    """A robust statistic of the round's per-client updates (non-private runs only).

    Each record adds ``factor * update`` with ``factor = weight * bound`` (the FedAvg weight times
    the mechanism's norm-bound scale); the per-client vector here is ``(factor / weight) * update``,
    the update after the norm bound, unweighted (a client of weight 0 trained on nothing and is
    left out). ``result`` holds the statistic as a sum of weight 1.
    """

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None) -> None:
        if clip_norm is not None:
            raise ValueError(f"the {type(self).__name__} aggregator is for non-private runs: under DP the noise is "
                             "calibrated to the sum of clipped updates, and a robust statistic voids that bound")
        super().__init__(like, clip_norm)

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        """The aggregate of the rows of ``stacked`` (clients x parameters, float64)."""
        raise NotImplementedError

    def result(self) -> RunningSum:
        rows = [r for r in self.records if r.weight > 0]
        out = RunningSum.zeros_like(self.like, None)
        out.count = len(self.records)
        out.clipped = sum(r.clipped for r in self.records)
        out.ids = [r.client_id for r in self.records]
        if not rows:
            return out
        names = list(self.like)
        stacked = torch.stack([torch.cat([(r.update[k].detach().to(torch.float64) * (r.factor / r.weight)).reshape(-1)
                                          for k in names]) for r in rows])
        flat = self.statistic(stacked)
        offset = 0
        for k in names:
            n = self.like[k].numel()
            out.total[k].copy_(flat[offset:offset + n].reshape(self.like[k].shape).to(out.total[k].dtype))
            offset += n
        out.weight = 1.0
        return out


class CoordinateMedian(_Robust):
    """The coordinate-wise median of the per-client updates (the mean of the two middle values
    when their number is even)."""

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.size(0)
        ordered = torch.sort(stacked, dim=0).values
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class TrimmedMean(_Robust):
    """The coordinate-wise beta-trimmed mean: in each coordinate the ``floor(beta * n)`` largest and
    smallest values are dropped and the rest averaged (Yin et al. 2018)."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None, trim_fraction: float = 0.1) -> None:
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        super().__init__(like, clip_norm)
        self.trim_fraction = trim_fraction

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.size(0)
        k = math.floor(self.trim_fraction * n)
        if n - 2 * k < 1:
            k = (n - 1) // 2
        ordered = torch.sort(stacked, dim=0).values
        return ordered[k:n - k].mean(dim=0)


class Krum(_Robust):
    """(Multi-)Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): score each update by the sum
    of squared distances to its ``n - f - 2`` nearest others, and average the ``selected`` updates
    of lowest score (``selected = 1``: Krum, the single best update). ``f`` is the number of
    Byzantine clients it is meant to withstand; with fewer than ``f + 3`` updates every update
    is scored against all the others."""

    def __init__(self, like: Mapping[str, torch.Tensor], clip_norm: float | None, byzantine: int = 1,
                 selected: int = 1) -> None:
        if byzantine < 0 or selected < 1:
            raise ValueError(f"krum needs byzantine >= 0 and selected >= 1, got {byzantine!r}, {selected!r}")
        super().__init__(like, clip_norm)
        self.byzantine, self.selected = byzantine, selected

    def scores(self, stacked: torch.Tensor) -> torch.Tensor:
        n = stacked.size(0)
        if n == 1:
            return torch.zeros(1, dtype=stacked.dtype)
        sq = (stacked * stacked).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2 * stacked @ stacked.T).clamp_min(0)  # squared distances
        d2.fill_diagonal_(0)
        neighbours = n - self.byzantine - 2 if n - self.byzantine - 2 >= 1 else n - 1
        nearest = torch.sort(d2, dim=1).values[:, 1:neighbours + 1]  # (column 0: itself, distance 0)
        return nearest.sum(dim=1)

    def statistic(self, stacked: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(self.scores(stacked), stable=True)
        return stacked[order[:min(self.selected, stacked.size(0))]].mean(dim=0)


AggregatorFactory = Callable[..., Aggregator]

AGGREGATORS: dict[str, AggregatorFactory] = {
    "streaming": StreamingSum, "buffered": Buffered,
    "median": CoordinateMedian, "trimmed-mean": TrimmedMean, "krum": Krum,
}
SUM_AGGREGATORS = frozenset({"streaming", "buffered"})
"""The aggregators whose result is the sum of the clipped updates: the only ones DP's noise covers."""


def make_aggregator(kind: str, like: Mapping[str, torch.Tensor], clip_norm: float | None,
                    options: Mapping[str, float] | None = None) -> Aggregator:
    """An aggregator of ``kind`` for one round (``options``: a robust aggregator's parameters)."""
    if kind not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {kind!r}; one of {sorted(AGGREGATORS)}")
    return AGGREGATORS[kind](like, clip_norm, **dict(options or {}))
