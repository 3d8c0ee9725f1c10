"""The run's privacy accounts: the ledger, epsilon from it, the budget check, privacy.json.

The privacy-critical bookkeeping of the engine, in one place:

* ``pay`` appends a round's event to the ledger and writes it durably (privacy.json, then
  ledger-head.json) -- the engine calls it before anything that the event pays for exists;
* ``epsilon`` is always ``epsilon_for(ledger)``, computed once per ledger change when asked;
* ``allows`` is the exact budget check of the next event, without an accountant call per
  round (:class:`~privlm.privacy.accountant.BudgetCheck`);
* ``write`` states the guarantee from the ledger and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dp_accounting

from privlm.privacy.accountant import BudgetCheck, epsilon_for
from privlm.privacy.guarantee import guarantee_record
from privlm.privacy.ledger import Ledger
from privlm.rundir import RunDir


@dataclass(frozen=True)
class ResolvedPrivacy:
    """The privacy settings of a run once resolved (delta defaulted, z calibrated): frozen."""

    mode: Literal["user", "none", "example"]
    delta: float | None  # None: non-private
    accountant: Literal["pld", "rdp"]
    budget: float | None  # no round may push epsilon past it (None: no stop)
    seeded_noise: bool  # tests only: the guarantee does not hold
    noise_multiplier: float | None
    clip_norm: float


class Accounts:
    """The ledger of one run and what follows from it."""

    def __init__(self, privacy: ResolvedPrivacy, rounds: int,
                 epsilon_of: Callable[[Ledger], float] | None = None) -> None:
        self.privacy, self.rounds = privacy, rounds
        # The run's epsilon as a function of the ledger: the whole ledger's composition, or (silos)
        # the largest silo's; always recomputed from the ledger, never carried over.
        self.epsilon_of = epsilon_of or (lambda ledger: epsilon_for(ledger, privacy.delta or 0.0, privacy.accountant))
        self.ledger = Ledger()
        self._epsilon = 0.0 if privacy.mode != "none" else math.inf
        self._eps_entries = 0  # the ledger length self._epsilon is for (-1: unknown)
        self._check: tuple[int, BudgetCheck] | None = None  # (ledger length it starts at, check)

    def load(self, ledger: Ledger) -> None:
        """Take over a ledger read back from disk (a resume): everything is recomputed from it."""
        self.ledger, self._eps_entries, self._check = ledger, -1, None

    def epsilon(self) -> float:
        """``epsilon_of(ledger)``: computed once per ledger change, when asked for."""
        if self._eps_entries != len(self.ledger):
            self._epsilon = self.epsilon_of(self.ledger)
            self._eps_entries = len(self.ledger)
        return self._epsilon

    @property
    def known_epsilon(self) -> float | None:
        """The epsilon of the ledger as it stands, if already computed (for progress bars)."""
        fresh = self._eps_entries == len(self.ledger) and len(self.ledger) > 0
        return self._epsilon if fresh and math.isfinite(self._epsilon) else None

    def allows(self, event: dp_accounting.DpEvent, round_index: int, group: int | None = None,
               constant: bool = True) -> bool:
        """Whether paying ``event`` for ``round_index`` (to ``group``'s account) keeps the ledger
        within the budget.

        Exact: for a mechanism whose rounds all cost the same, a :class:`BudgetCheck` finds once how
        many more such events fit (up to the last round), and is built anew whenever the ledger
        changed otherwise (a resume, another event); otherwise (events that vary by round, or
        accounts per group) the account's events with ``event`` are composed, once per round.
        """
        p = self.privacy
        if group is not None or not constant:
            return p.budget is None or self.epsilon_with(event, group) <= p.budget
        built = self._check
        if built is None or built[1].event != event or not 0 < len(self.ledger) - built[0] + 1 <= built[1].horizon:
            check = BudgetCheck(self.ledger.events, event, p.delta or 0.0, p.accountant, p.budget,
                                self.rounds - round_index + 1)
            built = self._check = (len(self.ledger), check)
        return built[1].allows(len(self.ledger) - built[0] + 1)

    def epsilon_with(self, event: dp_accounting.DpEvent, group: int | None = None) -> float:
        """The epsilon after paying ``event`` (to ``group``'s account: the largest account's, then)."""
        p = self.privacy
        if group is None:
            return epsilon_for([*self.ledger.events, event], p.delta or 0.0, p.accountant)
        others = [epsilon_for(self.ledger.for_group(g), p.delta or 0.0, p.accountant) for g in self.ledger.groups() if g != group]
        return max([epsilon_for([*self.ledger.for_group(group), event], p.delta or 0.0, p.accountant), *others])

    def write(self, rd: RunDir, record: dict) -> dict:
        """privacy.json (``record`` and the ledger), then ledger-head.json: what has been paid."""
        rd.write_privacy(record, ledger_json=self.ledger.to_json())
        rd.write_head(len(self.ledger), self.ledger.digest())
        return record

    def record(self, epsilon: float | None, **fields) -> dict:
        """The guarantee of the ledger as it stands (``fields``: the mechanism and population)."""
        p = self.privacy
        return guarantee_record(mode=p.mode, ledger=self.ledger, epsilon=epsilon, delta=p.delta or 0.0,
                                accountant=p.accountant, seeded_noise=p.seeded_noise,
                                budget=p.budget if p.mode != "none" else None, with_ledger=False, **fields)
