"""User-level DP-FedAvg with a fixed clip norm (McMahan, Ramage, Talwar, Zhang 2018).

Per round: every one of the N clients is sampled independently with probability q (Poisson
sampling, the amplification the accountant assumes); each accepted update is clipped to L2
norm C over all its tensors together; one Gaussian draw of std z*C per coordinate is added to
the sum, which is divided by the expected count q*N (the fixed denominator: a dropped or
rejected client never changes the guarantee). The round costs
``PoissonSampled(q, Gaussian(z))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregation import RunningSum, dp_mean, validate_and_norm
from privlm.mechanisms.base import Contribution, IndependentRounds, MechanismState, Params, Preprocessed
from privlm.privacy.accountant import round_event
from privlm.privacy.mechanism import clip_factor


def check_clipped(aggregate: RunningSum, clip_norm: float) -> None:
    """Noise calibrated to C means nothing unless the sum was clipped to that very C."""
    if aggregate.clip_norm != clip_norm:
        raise ValueError(f"the aggregate was clipped to {aggregate.clip_norm!r}, not to this round's C = {clip_norm!r}")


@dataclass(frozen=True)
class GaussianFedAvg(IndependentRounds):
    """Fixed-clip Gaussian mechanism on the sum of client updates, Poisson-sampled."""

    num_clients: int  # N
    clients_per_round: int  # q*N: expected clients, and the fixed denominator
    clip_norm_value: float  # C
    noise_multiplier: float  # z: what a round costs (the ledger's multiplier)

    def __post_init__(self) -> None:
        if not 0 < self.clients_per_round <= self.num_clients:
            raise ValueError("clients_per_round must be in [1, num_clients]")
        if not self.clip_norm_value > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm_value}")

    private = True

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @property
    def update_noise_multiplier(self) -> float:
        """The multiplier of the noise on the sum of updates."""
        return self.noise_multiplier

    def initial_state(self) -> MechanismState:
        return {}

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        if saved:
            raise ValueError(f"state {sorted(saved)} is not a fixed-clip mechanism's (adaptive clipping?)")
        return {}

    mode = "user"

    def event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        return round_event(self.sampling_rate, self.noise_multiplier)

    def clip_norm(self, state: Mapping[str, float]) -> float:
        return self.clip_norm_value

    def ledger_clip(self, state: Mapping[str, float]) -> float | None:
        return self.clip_norm_value

    def sample(self, rng: np.random.Generator, round_index: int = 1) -> list[int]:
        """Poisson(q): each client independently."""
        return np.flatnonzero(rng.random(self.num_clients) < self.sampling_rate).tolist()

    def preprocess(self, contribution: Contribution, state: Mapping[str, float],
                   reference: Mapping[str, torch.Tensor]) -> Preprocessed | str:
        """Validate (a reason to reject) and the clip scale; every update weighs 1."""
        reason, norm = validate_and_norm(contribution.update, reference)  # (one pass over the values)
        if reason is not None:
            return reason
        update: Mapping[str, torch.Tensor] = contribution.update  # type: ignore[assignment]
        c = self.clip_norm(state)
        return Preprocessed(contribution.client_id, update, 1.0 * clip_factor(norm, c), 1.0, norm > c, norm)

    def release(self, aggregate: RunningSum, state: Mapping[str, float], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]:
        """``(clipped sum + N(0, (zC)^2 I)) / (q N)``."""
        check_clipped(aggregate, self.clip_norm(state))
        if rng is None:
            raise ValueError("a private round needs a noise generator")
        return dp_mean(aggregate, self.update_noise_multiplier, self.clients_per_round, rng), dict(state)

    def guarantee_fields(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm_value,
                "adaptive_clipping": None}
