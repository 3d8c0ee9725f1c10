"""One round of (DP-)FedAvg as ``init`` / ``apply`` over an explicit server state.

User-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018), per round:

1. every one of the N clients is sampled independently with probability q
   (Poisson sampling: the amplification the accountant assumes);
2. each sampled client trains locally and sends ``local - global``;
3. the server validates each update (malformed ones are rejected, never
   summed), clips it to L2 norm C, and adds it to a running sum;
4. one Gaussian draw of std z*C per coordinate is added to the sum, which is
   divided by q*N (fixed denominator);
5. a server optimizer applies that mean.

The round's privacy cost is ``PoissonSampled(q, Gaussian(z))``: the runtime
records it in the ledger, durably, *before* it calls ``apply``.
Non-private FedAvg ("none") samples exactly ``clients_per_round`` clients and
takes the token-weighted mean of unclipped updates (McMahan et al. 2017).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"): C lives in the server state and after each round moves
geometrically towards the target quantile of the update norms,
``C <- C exp(-eta (b - gamma))``, where b is the noised fraction of updates with
norm <= C. The count query is a second Gaussian mechanism on the same sample;
the update noise is raised from z to z' = (z^-2 - (2 sigma_b)^-2)^-1/2 so that the
two together cost exactly one Gaussian mechanism with multiplier z, which is
what the ledger records.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregation import (
    RunningSum,
    dp_fraction_at_most_clip,
    dp_mean,
    validate_update,
    validate_weight,
    weighted_mean,
)
from privlm.federated.server_opt import ServerOptimizer
from privlm.privacy.accountant import round_event

log = logging.getLogger(__name__)

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-based clip norm (Andrew et al. 2021); the defaults are the paper's and TFF's."""

    target_quantile: float = 0.5  # gamma: the fraction of updates meant to be unclipped
    learning_rate: float = 0.2  # eta, of the geometric update
    count_stddev: float = 1.0  # sigma_b: std of the noise on the count of unclipped updates

    def update_noise_multiplier(self, z: float) -> float:
        """z' = (z^-2 - (2 sigma_b)^-2)^-1/2: the update noise that leaves room for the count."""
        if not 2 * self.count_stddev > z:
            raise ValueError(f"privacy.clipped_count_stddev: {self.count_stddev:g} is too small for noise "
                             f"multiplier {z:.4g}: it must exceed z/2 = {z / 2:.4g} (the paper's default is "
                             "clients_per_round / 20)")
        return (z**-2 - (2 * self.count_stddev) ** -2) ** -0.5

    def next_clip_norm(self, clip_norm: float, noised_fraction: float) -> float:
        return clip_norm * math.exp(-self.learning_rate * (noised_fraction - self.target_quantile))


@dataclass(frozen=True)
class DPFedAvg:
    """The algorithm's fixed settings."""

    num_clients: int  # N, the population the guarantee is about
    clients_per_round: int  # expected clients per round, q*N
    mode: Literal["user", "none"] = "user"
    clip_norm: float = 1.0  # C; with adaptive clipping the initial C (the state holds the current one)
    noise_multiplier: float = 1.0  # z: what a round costs (the ledger's multiplier)
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        if not 0 < self.clients_per_round <= self.num_clients:
            raise ValueError("clients_per_round must be in [1, num_clients]")
        if self.adaptive is not None:
            if not self.private:
                raise ValueError("adaptive clipping is part of user-level DP (mode = \"user\")")
            self.adaptive.update_noise_multiplier(self.noise_multiplier)  # refuses too little count noise

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the sum of updates (z, or z' with adaptive clipping)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return self.adaptive.update_noise_multiplier(self.noise_multiplier)

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def private(self) -> bool:
        return self.mode == "user"

    def round_event(self) -> dp_accounting.DpEvent:
        """The DP event one round of this algorithm is (for the ledger)."""
        if not self.private:
            return dp_accounting.NonPrivateDpEvent()
        return round_event(self.sampling_rate, self.noise_multiplier)

    def sample_clients(self, rng: np.random.Generator) -> list[int]:
        """Indices of this round's clients: Poisson(q) for DP, fixed-size otherwise."""
        if self.private:
            return np.flatnonzero(rng.random(self.num_clients) < self.sampling_rate).tolist()
        return sorted(rng.choice(self.num_clients, self.clients_per_round, replace=False).tolist())


@dataclass
class ServerState:
    params: Params
    opt_state: dict
    round: int = 0
    clip_norm: float | None = None  # C for the next round (changes only with adaptive clipping)


@dataclass(frozen=True)
class Contribution:
    """What one sampled client hands the server (after local training)."""

    client_id: str
    update: object  # validated before use: may be anything a client sent
    weight: float = 1.0  # tokens, for non-private FedAvg; ignored under DP
    train_loss: float | None = None


@dataclass(frozen=True)
class RoundStats:
    clients: int  # contributions aggregated
    rejected: int  # malformed contributions dropped
    clipped: int  # contributions whose norm exceeded C
    train_loss: float  # mean client training loss (NaN if none)
    rejections: tuple[tuple[str, str], ...] = ()
    clip_norm: float | None = None  # the C this round clipped to (None: non-private)


def init(algo: DPFedAvg, params: Params) -> ServerState:
    return ServerState(params={k: v.clone() for k, v in params.items()},
                       opt_state=algo.server_optimizer.init(params), round=0, clip_norm=algo.clip_norm)


def apply(
    algo: DPFedAvg,
    state: ServerState,
    contributions: Iterable[Contribution],
    noise: np.random.Generator | None,
) -> tuple[ServerState, RoundStats]:
    """Aggregate a round's contributions (streamed) and step the server optimizer."""
    clip_norm = state.clip_norm if state.clip_norm is not None else algo.clip_norm
    running = RunningSum.zeros_like(state.params, clip_norm if algo.private else None)
    rejections: list[tuple[str, str]] = []
    losses: list[float] = []
    for c in contributions:
        reason = validate_update(c.update, state.params)
        if reason is None and not algo.private:  # under DP every update weighs 1
            reason = validate_weight(c.weight)
        if reason is not None:
            log.warning("rejected update from client %s: %s", c.client_id, reason)
            rejections.append((c.client_id, reason))
            continue
        running.add(c.update, 1.0 if algo.private else c.weight)
        if isinstance(c.train_loss, (int, float)) and math.isfinite(c.train_loss):
            losses.append(float(c.train_loss))
    if algo.private:
        if noise is None:
            raise ValueError("a private round needs a noise generator")
        mean = dp_mean(running, algo.update_noise_multiplier, algo.clients_per_round, noise)
        if algo.adaptive is not None:  # after the update noise: the same generator, a fixed order
            fraction = dp_fraction_at_most_clip(running, algo.adaptive.count_stddev, algo.clients_per_round, noise)
            clip_norm = algo.adaptive.next_clip_norm(clip_norm, fraction)
    else:
        mean = weighted_mean(running)
    params, opt_state = algo.server_optimizer.apply(state.params, state.opt_state, mean)
    stats = RoundStats(
        clients=running.count,
        rejected=len(rejections),
        clipped=running.clipped,
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        rejections=tuple(rejections),
        clip_norm=running.clip_norm,
    )
    return ServerState(params=params, opt_state=opt_state, round=state.round + 1, clip_norm=clip_norm), stats
