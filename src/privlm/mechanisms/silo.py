"""Example-level DP in silos: each silo runs DP-SGD over its own records (Opacus; per-record
clipping, Poisson sampling of records, Gaussian noise on each step's sum), with a mechanism
that is a function of public settings only: q, the steps per round, z and C.

The server's average of the silos' updates is post-processing: it samples a fixed number of
silos and takes their plain mean (every silo weighs 1, no clipping, no noise). What each silo
spends is its own ledger's business: a silo pays :meth:`SiloDPSGD.event` for each round it
takes part in (the engine's silo-level protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregation import RunningSum
from privlm.federated.dp_sgd import ExampleDP
from privlm.mechanisms.base import Contribution, IndependentRounds, MechanismState, Params, Preprocessed
from privlm.mechanisms.nonprivate import NonPrivateFedAvg


@dataclass(frozen=True)
class SiloDPSGD(IndependentRounds):
    """DP-SGD in each silo (``dp``, ``steps`` per round, per-silo ``delta``); the server's plain mean."""

    num_clients: int  # silos
    clients_per_round: int  # silos sampled per round (fixed size: participation is not protected)
    dp: ExampleDP
    steps: int  # DP-SGD steps per round, from public settings
    delta: float  # per silo, from the public bound on records

    def __post_init__(self) -> None:
        if not (self.dp.noise_multiplier > 0 and self.steps >= 1 and 0 < self.delta < 1):
            raise ValueError("example-level DP needs noise (z > 0), steps >= 1 and delta in (0, 1)")

    mode = "example"
    private = False  # the server's release adds no noise: the noise is in each silo's DP-SGD

    @property
    def server(self) -> NonPrivateFedAvg:
        return NonPrivateFedAvg(self.num_clients, self.clients_per_round)

    @property
    def sampling_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    def event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        """One silo's cost for a round of ``steps`` DP-SGD steps."""
        step = dp_accounting.PoissonSampledDpEvent(self.dp.sampling_rate,
                                                   dp_accounting.GaussianDpEvent(self.dp.noise_multiplier))
        return step if self.steps == 1 else dp_accounting.SelfComposedDpEvent(step, self.steps)

    # The server's side: the plain mean of the silos' updates (post-processing).
    def initial_state(self) -> MechanismState:
        return {}

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        return self.server.load_state(saved)

    def clip_norm(self, state: Mapping[str, float]) -> None:
        return None

    def ledger_clip(self, state: Mapping[str, float]) -> None:
        return None

    def sample(self, rng: np.random.Generator, round_index: int = 1) -> list[int]:
        return self.server.sample(rng)

    def preprocess(self, contribution: Contribution, state: Mapping[str, float],
                   reference: Mapping[str, torch.Tensor]) -> Preprocessed | str:
        return self.server.preprocess(contribution, state, reference)

    def release(self, aggregate: RunningSum, state: Mapping[str, float], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]:
        return self.server.release(aggregate, state, rng)

    def guarantee_fields(self) -> dict:
        return {"noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "adaptive_clipping": None}
