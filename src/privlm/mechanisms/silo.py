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

from privlm.federated.dp_sgd import ExampleDP
from privlm.mechanisms.nonprivate import NonPrivateFedAvg


@dataclass(frozen=True)
class SiloDPSGD(NonPrivateFedAvg):
    """DP-SGD in each silo (``dp``, ``steps`` per round); the server's plain mean of silos."""

    dp: ExampleDP = ExampleDP(1.0, 0.0, 1.0)
    steps: int = 1  # DP-SGD steps per round, from public settings
    delta: float = 0.0  # per silo, from the public bound on records

    def event(self, state: Mapping[str, float]) -> dp_accounting.DpEvent:
        """One silo's cost for a round of ``steps`` DP-SGD steps."""
        step = dp_accounting.PoissonSampledDpEvent(self.dp.sampling_rate,
                                                   dp_accounting.GaussianDpEvent(self.dp.noise_multiplier))
        return step if self.steps == 1 else dp_accounting.SelfComposedDpEvent(step, self.steps)

    def guarantee_fields(self) -> dict:
        return {"noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                "adaptive_clipping": None}
