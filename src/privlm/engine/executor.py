"""The executor protocol: where clients' updates come from (FedJAX's ``for_each_client``).

An executor knows the population and runs local training; the engine owns everything else
(the budget, the ledger, sampling, aggregation, noise, release). Executors: sequential,
threads, worker processes and batched (vmapped) clients in this process's machine
(``privlm.runtime``), and the Flower grid (``privlm.runtime.flower``). Every in-process executor
yields the sequential stream, the same contributions in the order of ``ids``: to the bit
(tests/test_executors.py), the batched one within float32 rounding
(tests/test_batched_executor.py); a remote one may
yield in arrival order (then ``deterministic`` is False) and yields a :class:`Dropout` for a
client that never answered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union

from privlm.mechanisms.base import Contribution, Params


@dataclass(frozen=True)
class Dropout:
    """A sampled client that never answered (a remote runtime counts them); it adds nothing."""

    client_id: str
    reason: str


Reply = Union[Contribution, Dropout]


@dataclass(frozen=True)
class Population:
    """Who the guarantee's N are, as the executor found them."""

    client_ids: tuple[str, ...]
    description: str  # "the 24 clients of the data (in-process simulation)"
    runtime: str  # "in-process" or "flower": a resume must match it
    scrub_counts: dict[str, int] | None = None  # PII replaced on the clients (scrub.json), if scrubbed
    stats: dict = field(default_factory=dict)  # corpus statistics for the run's summary

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)


@dataclass(frozen=True)
class ServerView:
    """What an executor is told about a round: the global parameters and the round's number."""

    params: Params
    round: int  # the round being computed (1-based)
    clip_norm: float | None  # the C of this round (update canaries are scaled by it)


class Executor(Protocol):
    population: Population

    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        """Local training of each client ``ids[k]`` from ``view.params``, yielded in order, streamed."""
        ...

    def evaluate(self, params: Params) -> tuple[float, float]:
        """(loss, accuracy) of ``params`` on the evaluation clients' held-out text."""
        ...

    def start(self, run_dir: Path) -> None:
        """Acquire what the executor needs (processes, nodes) before any round is paid."""
        ...

    def close(self) -> None: ...

    @property
    def deterministic(self) -> bool:
        """Whether a round is a pure function of (params, round, seed) on this executor
        (False when, e.g., parallel threads draw dropout masks from one shared generator)."""
        ...
