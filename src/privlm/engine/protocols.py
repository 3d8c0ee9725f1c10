"""Who pays for a round, and when: the two payment protocols of the engine.

* :class:`CentralPayment` -- user-level DP and non-private FedAvg: one ledger entry per round,
  the mechanism's event, checked against the budget and durable before anyone is sampled.
* :class:`SiloPayment` -- example-level DP in silos: each sampled silo pays its own DP-SGD
  event into its own account (entries tagged with the silo), checked against the budget per
  silo; a silo out of budget stops contributing, for good. The silos' participation is not
  what this DP protects, so they are sampled before paying.

``pay`` returns ``(sampled ids, epsilon to report or None, stop reason or None)``.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import dp_accounting
import numpy as np

from privlm.errors import DataError
from privlm.privacy.accountant import epsilon_for
from privlm.rundir import RunDir

if TYPE_CHECKING:
    from privlm.config import RunConfig
    from privlm.engine.rounds import Engine
    from privlm.federated.dp_fedavg import ServerState

log = logging.getLogger(__name__)


def sampling_rng(cfg: RunConfig, round_index: int) -> np.random.Generator:
    """Which clients take part: secret under user-level DP (the sampling is part of the mechanism);
    in example-level mode the silos' participation is not what DP protects."""
    if cfg.privacy.seeded_noise or cfg.privacy.mode != "user":
        return np.random.default_rng([cfg.seed, round_index, 1])
    return np.random.Generator(np.random.Philox(key=secrets.randbits(128)))  # as the noise's


class CentralPayment:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def pending_allowed(self) -> bool:
        """Whether privacy.json may say "epsilon pending" between checkpoints (a budget-checked run)."""
        return self.engine.algo.mechanism.mode == "user"

    def silos_record(self) -> None:
        return None

    def epsilon_of(self, ledger) -> float:
        p = self.engine.privacy
        return epsilon_for(ledger, p.delta or 0.0, p.accountant)

    def pay(self, rd: RunDir, r: int, state: ServerState) -> tuple[list[int], float | None, str | None]:
        e = self.engine
        mech, accounts, p = e.algo.mechanism, e.accounts, e.privacy
        event, clip, group = mech.event(r), mech.ledger_clip(state.mechanism), mech.group(r)
        accounted = not isinstance(event, dp_accounting.NonPrivateDpEvent)  # (whoever adds the noise)
        paid = e.ledger.entry_for(r)
        if paid is not None:  # a resumed replay of a round already paid for
            if (paid.event, paid.clip_norm, paid.group) != (event, clip, group):
                raise DataError(f"{rd.privacy_path}: round {r} was paid for with a different "
                                "mechanism than config.toml describes")
        else:
            if accounted and not accounts.allows(event, r, group, mech.constant_event):
                over = accounts.epsilon_with(event, group)
                return [], None, (f"budget stop: round {r} would raise epsilon to {over:.4f}, "
                                  f"above the budget {p.budget:g}; it did not run")
            e.ledger.append(r, event, clip_norm=clip, group=group)
            e.write_privacy(rd, r - 1, exact=not accounted)
        eps = accounts.epsilon() if accounted and e.epsilon_due(r) else None
        if eps is not None and p.budget is not None and eps > p.budget:
            # BudgetCheck assumes epsilon never falls as rounds are added; should
            # dp-accounting's numbers ever break that, nothing is released over budget.
            return [], eps, (f"budget stop: round {r} raised epsilon to {eps:.4f}, above the budget "
                             f"{p.budget:g}; it was paid for but did not run")
        return mech.sample(sampling_rng(e.cfg, r), r), eps, None

    def after_resume(self, rd: RunDir) -> None:
        pass


class SiloPayment:
    def __init__(self, engine: Engine, silo_ids: list[str]) -> None:
        self.engine = engine
        self.silo_ids = silo_ids  # by client index
        self.epsilon: dict[str, float] = {s: 0.0 for s in silo_ids}  # each silo's, for privacy.json
        self.stopped: dict[str, str] = {}

    pending_allowed = False

    def epsilon_of(self, ledger) -> float:
        """The run's epsilon: the largest silo's, each from its own entries of ``ledger``."""
        p = self.engine.privacy
        return max((epsilon_for(ledger.for_silo(s), p.delta or 0.0, p.accountant) for s in self.silo_ids), default=0.0)

    def silos_record(self) -> list[dict]:
        m = self.engine.algo.mechanism
        return [{"silo": s, "epsilon": self.epsilon[s], "sampling_rate": m.dp.sampling_rate,  # type: ignore[attr-defined]
                 "noise_multiplier": m.dp.noise_multiplier, "steps_per_round": m.steps,  # type: ignore[attr-defined]
                 "stopped": self.stopped.get(s)} for s in self.silo_ids]

    def pay(self, rd: RunDir, r: int, state: ServerState) -> tuple[list[int], float | None, str | None]:
        """Which silos train in round ``r``, each having paid first (durably, before any trains)."""
        e = self.engine
        mech, p = e.algo.mechanism, e.privacy
        event = mech.event(r)
        ids = mech.sample(sampling_rng(e.cfg, r), r)
        paid = {x.silo for x in e.ledger if x.round == r and not x.lost and x.silo is not None}
        if paid:  # a resumed (seeded) replay: exactly the silos that paid, with the planned events
            for x in e.ledger:
                if x.round == r and not x.lost and x.silo is not None and x.event != event:
                    raise DataError(f"{rd.privacy_path}: round {r} of silo {x.silo} was paid for with "
                                    "a different mechanism than config.toml describes")
            return [i for i in ids if self.silo_ids[i] in paid], e.accounts.epsilon(), None
        active = []
        for i in ids:
            sid = self.silo_ids[i]
            if sid in self.stopped:
                continue
            eps = epsilon_for([*e.ledger.for_silo(sid), event], p.delta or 0.0, p.accountant)
            if p.budget is not None and eps > p.budget:
                self.stopped[sid] = (f"stopped before round {r}: it would raise the silo's epsilon "
                                     f"to {eps:.4f}, above the budget {p.budget:g}")
                log.warning("silo %s %s", sid, self.stopped[sid])
                continue
            e.ledger.append(r, event, silo=sid)
            self.epsilon[sid] = eps
            active.append(i)
        if len(self.stopped) == len(self.silo_ids):
            return [], None, f"budget stop: every silo has reached its budget; round {r} did not run"
        e.write_privacy(rd, r - 1)
        return active, e.accounts.epsilon(), None

    def after_resume(self, rd: RunDir) -> None:
        """Each silo's epsilon from its own entries of the loaded ledger."""
        e, p = self.engine, self.engine.privacy
        for sid in self.epsilon:
            self.epsilon[sid] = epsilon_for(e.ledger.for_silo(sid), p.delta or 0.0, p.accountant)
