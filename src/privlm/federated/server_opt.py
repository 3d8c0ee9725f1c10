"""Server optimizers: turn the (noised) mean update into new global parameters.

Post-processing of the released mean, so they cost no privacy.
FedAvg: ``w += lr * mean``. FedAvgM (Hsu et al. 2019): server momentum,
``m = beta1 * m + mean; w += lr * m``. FedAdam (Reddi et al. 2021, "Adaptive Federated
Optimization"): Adam moments over the mean update, with adaptivity ``tau``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from privlm.federated.schedule import Schedule, scheduled_lr

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizer:
    name: Literal["fedavg", "fedavgm", "fedadam"] = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    schedule: Schedule = "constant"  # the server lr over the rounds (privlm.federated.schedule)
    rounds: int = 1
    lr_final: float = 1.0

    def init(self, params: Params) -> dict[str, Params]:
        if self.name == "fedadam":
            return {
                "m": {k: torch.zeros_like(v) for k, v in params.items()},
                "v": {k: torch.full_like(v, self.tau**2) for k, v in params.items()},
            }
        if self.name == "fedavgm":
            return {"m": {k: torch.zeros_like(v) for k, v in params.items()}}
        return {}

    def apply(
        self, params: Params, state: dict[str, Params], mean_update: Params, round_index: int = 1
    ) -> tuple[Params, dict[str, Params]]:
        lr = scheduled_lr(self.lr, self.schedule, round_index, self.rounds, self.lr_final)
        if self.name == "fedavg":
            return {k: params[k] + lr * mean_update[k] for k in params}, state
        if self.name == "fedavgm":
            m = {k: self.beta1 * state["m"][k] + mean_update[k] for k in params}
            return {k: params[k] + lr * m[k] for k in params}, {"m": m}
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * mean_update[k] for k in params}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * mean_update[k] ** 2 for k in params}
        new = {k: params[k] + lr * m[k] / (v[k].sqrt() + self.tau) for k in params}
        return new, {"m": m, "v": v}
