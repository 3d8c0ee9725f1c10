"""Non-private FedAvg (McMahan et al. 2017): exactly ``clients_per_round`` clients, sampled
without replacement; the token-weighted mean of the updates. Its ledger entries are
``NonPrivateDpEvent``: the run states that there is no guarantee.

``norm_bound`` (optional): each update is scaled to L2 norm at most B before the mean, the
norm-bounding defence against poisoning of Sun et al. 2019, without noise and so without a
guarantee (the sum stays in the parameters' dtype and carries no clip norm: it is not DP's)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregation import RunningSum, validate_and_norm, validate_update, validate_weight, weighted_mean
from privlm.mechanisms.base import Contribution, IndependentRounds, MechanismState, Params, Preprocessed


@dataclass(frozen=True)
class NonPrivateFedAvg(IndependentRounds):
    num_clients: int
    clients_per_round: int
    norm_bound: float | None = None  # B: each update scaled to norm <= B (no noise: no guarantee)

    def __post_init__(self) -> None:
        if not 0 < self.clients_per_round <= self.num_clients:
            raise ValueError("clients_per_round must be in [1, num_clients]")
        if self.norm_bound is not None and not (0 < self.norm_bound < float("inf")):
            raise ValueError(f"norm_bound must be finite and > 0, got {self.norm_bound!r}")

    private = False

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    def initial_state(self) -> MechanismState:
        return {}

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        if saved:
            raise ValueError(f"state {sorted(saved)} is not non-private FedAvg's")
        return {}

    mode = "none"

    def event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        return dp_accounting.NonPrivateDpEvent()

    def clip_norm(self, state: Mapping[str, float]) -> None:
        return None

    def ledger_clip(self, state: Mapping[str, float]) -> None:
        return None

    def sample(self, rng: np.random.Generator, round_index: int = 1) -> list[int]:
        return sorted(rng.choice(self.num_clients, self.clients_per_round, replace=False).tolist())

    def preprocess(self, contribution: Contribution, state: Mapping[str, float],
                   reference: Mapping[str, torch.Tensor]) -> Preprocessed | str:
        if self.norm_bound is None:
            reason = validate_update(contribution.update, reference) or validate_weight(contribution.weight)
            if reason is not None:
                return reason
            w = contribution.weight
            return Preprocessed(contribution.client_id, contribution.update, w, w, False, None)  # type: ignore[arg-type]
        problem, norm = validate_and_norm(contribution.update, reference)
        reason = problem or validate_weight(contribution.weight)
        if reason is not None:
            return reason
        w = float(contribution.weight)
        scale = min(1.0, self.norm_bound / norm) if norm > 0 else 1.0
        return Preprocessed(contribution.client_id, contribution.update, w * scale, w,  # type: ignore[arg-type]
                            norm > self.norm_bound, norm)

    def release(self, aggregate: RunningSum, state: Mapping[str, float], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]:
        if aggregate.clip_norm is not None:
            raise ValueError("non-private FedAvg averages unclipped updates")
        return weighted_mean(aggregate), dict(state)

    def guarantee_fields(self) -> dict:
        return {"noise_multiplier": None, "clip_norm": None, "adaptive_clipping": None}
