"""DP-FedAvg with adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021).

C lives in the mechanism's state and after each round moves geometrically towards the target
quantile of the update norms, ``C <- C exp(-eta (b - gamma))``, where b is the noised fraction
of updates with norm <= C. The count query is a second Gaussian mechanism on the same sample;
the update noise is raised from z to z' = (z^-2 - (2 sigma_b)^-2)^-1/2 so that the two together
cost exactly one Gaussian mechanism with multiplier z, which is what the ledger records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from privlm.federated.aggregation import RunningSum, dp_fraction_at_most_clip, dp_mean
from privlm.mechanisms.base import MechanismState, Params
from privlm.mechanisms.gaussian import GaussianFedAvg, check_clipped


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-based clip norm settings; the defaults are the paper's and TFF's."""

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
class AdaptiveClipGaussian(GaussianFedAvg):
    """:class:`GaussianFedAvg` whose C (the state's ``clip_norm``) follows a quantile of the norms."""

    adaptive: AdaptiveClipping = AdaptiveClipping()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adaptive.update_noise_multiplier(self.noise_multiplier)  # refuses too little count noise

    @property
    def update_noise_multiplier(self) -> float:
        return self.adaptive.update_noise_multiplier(self.noise_multiplier)

    def initial_state(self) -> MechanismState:
        return {"clip_norm": self.clip_norm_value}

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        c = saved.get("clip_norm")
        if set(saved) != {"clip_norm"} or isinstance(c, bool) or not isinstance(c, (int, float)) \
                or not (math.isfinite(c) and c > 0):
            raise ValueError(f"state {dict(saved)!r} is not adaptive clipping's (a positive clip_norm)")
        return {"clip_norm": float(c)}

    def clip_norm(self, state: Mapping[str, float]) -> float:
        return state["clip_norm"]

    def ledger_clip(self, state: Mapping[str, float]) -> float | None:
        return None  # C moves with the data; the entry's event is what the round costs

    def release(self, aggregate: RunningSum, state: Mapping[str, float], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]:
        """The noised mean, then (same generator, fixed order) the noised count and the next C."""
        check_clipped(aggregate, self.clip_norm(state))
        if rng is None:
            raise ValueError("a private round needs a noise generator")
        mean = dp_mean(aggregate, self.update_noise_multiplier, self.clients_per_round, rng)
        fraction = dp_fraction_at_most_clip(aggregate, self.adaptive.count_stddev, self.clients_per_round, rng)
        return mean, {"clip_norm": self.adaptive.next_clip_norm(state["clip_norm"], fraction)}

    def guarantee_fields(self) -> dict:
        a = self.adaptive
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm_value,
                "adaptive_clipping": {
                    "initial_clip_norm": self.clip_norm_value, "target_quantile": a.target_quantile,
                    "learning_rate": a.learning_rate, "clipped_count_stddev": a.count_stddev,
                    "update_noise_multiplier": self.update_noise_multiplier}}
