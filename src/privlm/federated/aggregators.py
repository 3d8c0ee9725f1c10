"""Aggregators: where a round's preprocessed updates go before the mechanism releases them.

* :class:`StreamingSum` -- today's: each update is folded into one running sum as it arrives
  and dropped (O(model) memory however many clients a round has);
* :class:`Buffered` -- keeps every preprocessed update of the round (O(clients x model)), for
  statistics that are not a sum (robust aggregation); its sum is the streaming sum, to the bit;
* :class:`PreSummed` -- the sum was computed elsewhere (secure aggregation: the server only
  ever sees the sum of the masked, clipped updates); it takes no single update.

All three end in the same :class:`~privlm.federated.aggregation.RunningSum` that a
mechanism's ``release`` reads (clip norm, counts, float64 total under DP).
"""

from __future__ import annotations

from collections.abc import Mapping
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


AGGREGATORS: dict[str, type[StreamingSum] | type[Buffered]] = {"streaming": StreamingSum, "buffered": Buffered}
