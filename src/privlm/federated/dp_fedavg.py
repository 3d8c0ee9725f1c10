"""One round of FedAvg as ``init`` / ``apply`` over an explicit server state (FedJAX's shape).

The algorithm is a mechanism (``privlm.mechanisms``: what is sampled, how an update is
validated and clipped, how the aggregate is released, what a round costs) and a server
optimizer. ``apply`` is the same for every mechanism:

    for each contribution (streamed): mechanism.preprocess -> aggregator.add   (or reject)
    mechanism.release(aggregator.result(), state, noise) -> (mean, new mechanism state)
    server optimizer step

The round's privacy cost, ``mechanism.event()``, is recorded in the ledger by the engine,
durably, *before* it calls ``apply``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregators import AGGREGATORS, SUM_AGGREGATORS, Aggregator, make_aggregator
from privlm.federated.server_opt import ServerOptimizer
from privlm.mechanisms import (AdaptiveClipGaussian, AdaptiveClipping, Contribution, GaussianFedAvg, Mechanism,
                               NonPrivateFedAvg)

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]

__all__ = ["AdaptiveClipping", "Contribution", "DPFedAvg", "FedAvg", "RoundStats", "ServerState", "apply", "init"]


@dataclass(frozen=True)
class FedAvg:
    """The algorithm's fixed parts: the mechanism, the server optimizer, the aggregator kind."""

    mechanism: Mechanism
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    aggregator: str = "streaming"  # a key of privlm.federated.aggregators.AGGREGATORS
    aggregator_options: Mapping[str, float] = field(default_factory=dict)  # a robust aggregator's parameters

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; one of {sorted(AGGREGATORS)}")
        if self.mechanism.private and self.aggregator not in SUM_AGGREGATORS:
            raise ValueError(f"the {self.aggregator!r} aggregator would void the DP guarantee: the noise is calibrated "
                             "to the sum of clipped updates (sensitivity C), and a robust statistic of them has no "
                             "such bound; under DP the defences are the clip norm and the noise")

    # The mechanism's public numbers, for the callers that report them.
    @property
    def private(self) -> bool:
        return self.mechanism.private

    @property
    def num_clients(self) -> int:
        return self.mechanism.num_clients

    @property
    def clients_per_round(self) -> int:
        return self.mechanism.clients_per_round

    @property
    def sampling_rate(self) -> float:
        return self.mechanism.sampling_rate

    @property
    def update_noise_multiplier(self) -> float | None:
        """The multiplier of the noise on the sum of updates (None: no server noise)."""
        return getattr(self.mechanism, "update_noise_multiplier", None)

    def round_event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        return self.mechanism.event(round_index)

    def sample_clients(self, rng: np.random.Generator, round_index: int = 1) -> list[int]:
        return self.mechanism.sample(rng, round_index)


def DPFedAvg(num_clients: int, clients_per_round: int, mode: Literal["user", "none"] = "user",  # noqa: N802
             clip_norm: float = 1.0, noise_multiplier: float = 1.0,
             server_optimizer: ServerOptimizer | None = None, adaptive: AdaptiveClipping | None = None) -> FedAvg:
    """(DP-)FedAvg from its numbers: fixed-clip or adaptive Gaussian, or non-private."""
    mechanism: Mechanism
    if mode == "none":
        if adaptive is not None:
            raise ValueError("adaptive clipping is part of user-level DP (mode = \"user\")")
        mechanism = NonPrivateFedAvg(num_clients, clients_per_round)
    elif adaptive is not None:
        mechanism = AdaptiveClipGaussian(num_clients, clients_per_round, clip_norm, noise_multiplier, adaptive)
    else:
        mechanism = GaussianFedAvg(num_clients, clients_per_round, clip_norm, noise_multiplier)
    return FedAvg(mechanism, server_optimizer or ServerOptimizer())


@dataclass
class ServerState:
    params: Params
    opt_state: dict
    round: int = 0
    mechanism: dict[str, Any] = field(default_factory=dict)  # e.g. adaptive clipping's current C

    @property
    def clip_norm(self) -> float | None:
        """Adaptive clipping's C for the next round (None for other mechanisms)."""
        return self.mechanism.get("clip_norm")


@dataclass(frozen=True)
class RoundStats:
    clients: int  # contributions aggregated
    rejected: int  # malformed contributions dropped
    clipped: int  # contributions whose norm exceeded C
    train_loss: float  # mean client training loss (NaN if none)
    rejections: tuple[tuple[str, str], ...] = ()
    clip_norm: float | None = None  # the C this round clipped to (None: non-private)


def init(algo: FedAvg, params: Params) -> ServerState:
    return ServerState(params={k: v.clone() for k, v in params.items()},
                       opt_state=algo.server_optimizer.init(params), round=0,
                       mechanism=algo.mechanism.initial_state())


def apply(
    algo: FedAvg,
    state: ServerState,
    contributions: Iterable[Contribution],
    noise: np.random.Generator | None,
) -> tuple[ServerState, RoundStats]:
    """Preprocess and aggregate a round's contributions (streamed), release, step the server.

    The aggregator is made here, for this round's C (``algo.aggregator`` names its kind), so the
    sum the release noises is clipped to the C the noise is calibrated to.
    """
    mech = algo.mechanism
    clip_norm = mech.clip_norm(state.mechanism)
    agg: Aggregator = make_aggregator(algo.aggregator, state.params, clip_norm, algo.aggregator_options)
    rejections: list[tuple[str, str]] = []
    losses: list[float] = []
    for c in contributions:
        record = mech.preprocess(c, state.mechanism, state.params)
        if isinstance(record, str):
            log.warning("rejected update from client %s: %s", c.client_id, record)
            rejections.append((c.client_id, record))
            continue
        agg.add(record)
        if isinstance(c.train_loss, (int, float)) and math.isfinite(c.train_loss):
            losses.append(float(c.train_loss))
    total = agg.result()
    mean, mech_state = mech.release(total, state.mechanism, noise if mech.private else None)
    params, opt_state = algo.server_optimizer.apply(state.params, state.opt_state, mean, state.round + 1)
    stats = RoundStats(
        clients=total.count,
        rejected=len(rejections),
        clipped=total.clipped,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        rejections=tuple(rejections),
        clip_norm=total.clip_norm,
    )
    return ServerState(params=params, opt_state=opt_state, round=state.round + 1, mechanism=mech_state), stats
