"""What a mechanism is: the shape of tensorflow_privacy's ``DPQuery``, for one federated round.

A mechanism owns, for the server's side of a round:

* its **state** (``initial_state``; named numbers, JSON values or tensors that the run directory
  saves generically, e.g. adaptive clipping's current C, banded MF's last noise draws);
* the **event** round t costs (``event(t)``, a function of public settings only): computed
  before anyone is sampled, so the engine can write it to the ledger, durably, before anything
  it pays for exists;
* who takes part (``sample``): the sampling is part of the mechanism (amplification);
* whose **account** a round's event is charged to (``group(t)``: None for one account of the
  whole population; banded MF's cyclic sampling keeps one per participation group, and the run's
  epsilon is the largest), and what a round lost to a crash costs on top of its own entry
  (``lost_surcharge(t)``);
* **preprocessing** of each update (``preprocess``): validate (a reason to reject, never an
  exception), then the clip scale; the same function runs wherever the update is made;
* the **release** (``release(aggregate, state, rng) -> (mean, new state)``): noise and the
  fixed denominator, refused unless the aggregate was clipped to this round's C;
* what it is, for the guarantee text (``guarantee_fields``).

Mechanisms never import the engine, a runtime or the config: they are built from numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import dp_accounting
import numpy as np
import torch

if TYPE_CHECKING:
    from privlm.federated.aggregation import RunningSum

Params = dict[str, torch.Tensor]
MechanismState = dict[str, Any]  # numbers and JSON values, or tensors: saved in the resume state


@dataclass(frozen=True)
class Contribution:
    """What one sampled client hands the server (after local training)."""

    client_id: str
    update: object  # validated before use: may be anything a client sent
    weight: float = 1.0  # tokens, for non-private FedAvg; ignored under DP
    train_loss: float | None = None


@dataclass(frozen=True)
class Preprocessed:
    """A validated update as an aggregator takes it: it adds ``factor * update`` to the sum.

    Under DP ``factor`` is the clip scale ``min(1, C'/norm)`` (the clipped copy is never
    materialised) and ``weight`` is 1; without DP ``factor`` is the client's FedAvg weight.
    """

    client_id: str
    update: Mapping[str, torch.Tensor]
    factor: float
    weight: float
    clipped: bool  # its norm exceeded C
    norm: float | None  # L2 norm before clipping (None: not computed, non-private)


class Mechanism(Protocol):
    """One round's server-side mechanism (see the module docstring)."""

    @property
    def num_clients(self) -> int:
        """N, the population the guarantee is about."""
        ...

    @property
    def clients_per_round(self) -> int:
        """Expected clients per round, q*N (the fixed denominator of a DP release)."""
        ...

    @property
    def private(self) -> bool:
        """Whether the server's release adds noise (False for non-private FedAvg, and for silos,
        whose noise is added inside each silo's DP-SGD)."""
        ...

    @property
    def sampling_rate(self) -> float: ...

    def initial_state(self) -> MechanismState: ...

    @property
    def mode(self) -> str:
        """The privacy mode it implements ("user", "none", "example"): the engine's protocol must match."""
        ...

    def event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        """What round ``round_index`` costs. It takes no state: an event chosen from data (adaptive
        clipping's C, say) would need a privacy filter to compose."""
        ...

    @property
    def constant_event(self) -> bool:
        """Whether every round costs the same event (the budget check then works out once how many fit)."""
        ...

    def group(self, round_index: int) -> int | None:
        """The account round ``round_index`` is charged to (None: the whole population's one)."""
        ...

    def lost_surcharge(self, round_index: int) -> list[tuple[dp_accounting.DpEvent, int | None]]:
        """Events (and accounts) a lost round costs besides its own entry, which stays counted: none
        for independent noise; correlated noise released twice for one round costs more."""
        ...

    def ledger_clip(self, state: Mapping[str, float]) -> float | None:
        """The clip norm a ledger entry records (a fixed C), or None."""
        ...

    def clip_norm(self, state: Mapping[str, float]) -> float | None:
        """The C this round clips to (None: nothing is clipped)."""
        ...

    def sample(self, rng: np.random.Generator, round_index: int = 1) -> list[int]: ...

    def preprocess(self, contribution: Contribution, state: Mapping[str, float],
                   reference: Mapping[str, torch.Tensor]) -> Preprocessed | str: ...

    def release(self, aggregate: RunningSum, state: Mapping[str, float], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]: ...

    def guarantee_fields(self) -> dict: ...

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        """The mechanism's state from a resume file's values; ValueError when it is not this one's."""
        ...


class IndependentRounds:
    """For mechanisms whose rounds draw independent noise: every round costs the same event, in
    one account, and a lost round's own (still counted) entry is its whole cost."""

    constant_event = True

    def group(self, round_index: int) -> None:
        return None

    def lost_surcharge(self, round_index: int) -> list[tuple[dp_accounting.DpEvent, int | None]]:
        return []
