"""Banded matrix factorization (BandMF, DP-FTRL's successor): noise correlated across rounds.

Round t releases ``(x_t + y_t) / m``: the clipped sum of updates plus ``y = C^-1 w``, with
``w_t ~ N(0, (zC)^2 I)`` drawn fresh each round and C the banded Toeplitz strategy of
:mod:`privlm.privacy.banded` (``c_0..c_{b-1}``, ``||c|| = 1``, optimised for the model's
prefix sums). ``y_t = (w_t - sum_{j=1}^{b-1} c_j y_{t-j}) / c_0``, so the state is the last
``b - 1`` draws of y (float64, saved in the resume state). Every release is post-processing
of ``Cx + w`` (Choquette-Choo et al. 2023), so what a user risks is a Gaussian mechanism whose
sensitivity follows from C and how the user can take part:

* ``sampling = "none"`` -- **no sampling assumed**: clients check in when they can (the
  simulation draws ``clients_per_round`` check-ins a round; on Flower, the nodes that answer);
  the server admits a client only if it took part fewer than ``k`` times and not in the last
  ``b - 1`` rounds, and refuses the others (counted as rejected; never summed). Round t adds
  ``c_{(t-1) mod b}^2`` to the squared sensitivity while ``t <= k b`` and nothing after
  (:func:`~privlm.privacy.banded.sensitivity_increment`), so it costs ``Gaussian(z / |c_j|)``
  (``NoOp`` past ``k b``): the ledger composes to one Gaussian mechanism with multiplier
  ``z / sensitivity`` of the released prefix, exactly.
* ``sampling = "cyclic-poisson"`` -- **amplified** (b-min-separation cyclic Poisson sampling):
  client ``i`` belongs to group ``group_of(i, b)``, a hash of its own id alone (so adding or
  removing one client moves no other one: add/remove adjacency holds, and a resume with a
  changed population keeps every client in its group); round t samples each member of group
  ``(t-1) mod b`` independently with ``q = b m / N`` and refuses any other client. A user's
  participations are then >= b rounds apart and each is a Poisson-sampled Gaussian on a block
  of rows disjoint from the others', so a group's rounds compose as DP-SGD's: round t charges
  ``PoissonSampled(q, Gaussian(z))`` to its group's account and the run's epsilon is the
  largest group's (Choquette-Choo et al. 2023, Thm. 4; jax_privacy's ``amplified_bandmf_event``).

A round lost to a crash (paid, released perhaps, its result never saved; secure noise) is
one more row of the strategy matrix with fresh noise. It touches at most one of a user's
columns (they are >= b apart), with weight ``c_j`` for ``j`` rounds earlier: without sampling
that adds at most ``max c_j^2`` to the squared sensitivity (``Gaussian(z / max |c_j|)``); with
cyclic sampling the block of the affected participation of group ``(t-1-j) mod b`` gains a row,
which we bound by giving up its amplification (``Gaussian(z / sqrt(1 + c_j^2))`` more for that
group). See :meth:`BandedMF.lost_surcharge`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import dp_accounting
import numpy as np
import torch

from privlm.federated.aggregation import RunningSum, validate_and_norm
from privlm.mechanisms.base import Contribution, MechanismState, Params, Preprocessed
from privlm.mechanisms.gaussian import check_clipped
from privlm.privacy.banded import max_participations, sensitivity_increment, sensitivity_squared
from privlm.privacy.mechanism import clip_factor

Sampling = Literal["cyclic-poisson", "none"]
SAMPLINGS: tuple[str, ...] = ("cyclic-poisson", "none")


def group_of(client_id: str, bands: int) -> int:
    """The cyclic-sampling group of ``client_id``: a function of that id alone (never of who
    else is in the population), public and fixed for the run."""
    digest = hashlib.sha256(b"privlm/banded-mf/group\0" + client_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % bands


@dataclass(frozen=True)
class BandedMF:
    """The banded-MF mechanism on the sum of clipped client updates (see the module docstring)."""

    num_clients: int  # N
    clients_per_round: int  # m: expected clients (cyclic-poisson) or check-ins (none); the fixed denominator
    clip_norm_value: float  # C
    noise_multiplier: float  # z: the std of w, the noise on C x, in units of C
    coefficients: tuple[float, ...]  # c_0..c_{b-1}, unit norm
    rounds: int  # T, what C was optimised for
    sampling: Sampling = "cyclic-poisson"
    participation_limit: int | None = None  # k (sampling "none"; None: as often as b allows)
    workload: str = "prefix"
    client_ids: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the population (cyclic sampling)

    def __post_init__(self) -> None:
        b = len(self.coefficients)
        if self.client_ids and len(self.client_ids) != self.num_clients:
            raise ValueError(f"{len(self.client_ids)} client ids for num_clients = {self.num_clients}")
        if not 0 < self.clients_per_round <= self.num_clients:
            raise ValueError("clients_per_round must be in [1, num_clients]")
        if not self.clip_norm_value > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm_value}")
        if b < 1 or not self.coefficients[0] > 0 or not math.isclose(math.fsum(c * c for c in self.coefficients), 1.0,
                                                                      rel_tol=0.0, abs_tol=1e-12):
            raise ValueError("coefficients must have c_0 > 0 and unit norm")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.sampling == "cyclic-poisson" and self.clients_per_round * b > self.num_clients:
            raise ValueError(f"clients_per_round x bands = {self.clients_per_round * b} exceeds the {self.num_clients} "
                             "clients: each of the b groups must hold at least clients_per_round of them")
        if self.participation_limit is not None and self.participation_limit < 1:
            raise ValueError("participation_limit must be >= 1")
        object.__setattr__(self, "_groups", np.array([group_of(cid, b) for cid in self.client_ids], dtype=np.int64))

    mode = "user"
    private = True

    @property
    def bands(self) -> int:
        return len(self.coefficients)

    @property
    def constant_event(self) -> bool:
        return self.sampling == "cyclic-poisson" or self.bands == 1 and self.participation_limit is None

    @property
    def participations(self) -> int:
        """k: the most times one user takes part in the run's T rounds (>= b apart)."""
        limit = self.participation_limit if self.sampling == "none" else None
        return max_participations(self.rounds, self.bands, limit)

    @property
    def sampling_rate(self) -> float:
        """q within a group (cyclic-poisson); the check-in rate m/N for "none" (no assumption rests on it)."""
        if self.sampling == "cyclic-poisson":
            return self.clients_per_round * self.bands / self.num_clients
        return self.clients_per_round / self.num_clients

    @property
    def sensitivity(self) -> float:
        """Of the whole run's ``Cx``, per unit of C (sampling "none"; cyclic: of one participation, 1)."""
        if self.sampling == "cyclic-poisson":
            return 1.0
        return math.sqrt(sensitivity_squared(self.coefficients, self.rounds, self.participations))

    # -- the accounts ---------------------------------------------------------------
    def event(self, round_index: int = 1) -> dp_accounting.DpEvent:
        z = self.noise_multiplier
        if self.sampling == "cyclic-poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(z))
        inc = sensitivity_increment(self.coefficients, round_index, self.participations)
        return dp_accounting.GaussianDpEvent(z / math.sqrt(inc)) if inc > 0 else dp_accounting.NoOpDpEvent()

    def group(self, round_index: int) -> int | None:
        return (round_index - 1) % self.bands if self.sampling == "cyclic-poisson" else None

    def lost_surcharge(self, round_index: int) -> list[tuple[dp_accounting.DpEvent, int | None]]:
        """What a lost round costs besides its own entry (see the module docstring)."""
        z, c = self.noise_multiplier, self.coefficients
        if self.sampling == "none":
            return [(dp_accounting.GaussianDpEvent(z / max(abs(v) for v in c)), None)]
        return [(dp_accounting.GaussianDpEvent(z / math.sqrt(1 + c[j] ** 2)), (round_index - 1 - j) % self.bands)
                for j in range(1, self.bands) if round_index - j >= 1 and c[j] != 0]

    def ledger_clip(self, state: Mapping[str, object]) -> float | None:
        return self.clip_norm_value

    def clip_norm(self, state: Mapping[str, object]) -> float:
        return self.clip_norm_value

    # -- state ------------------------------------------------------------------------
    def initial_state(self) -> MechanismState:
        state: MechanismState = {"released": 0}
        if self.sampling == "none":
            state["participation"] = {}
        return state

    def load_state(self, saved: Mapping[str, object]) -> MechanismState:
        released = saved.get("released")
        if isinstance(released, bool) or not isinstance(released, int) or released < 0:
            raise ValueError(f"state {sorted(saved)} is not banded MF's (an integer 'released')")
        want = {"released"} | {f"noise/{j}/" for j in range(1, min(self.bands - 1, released) + 1)}
        keys = {k if not k.startswith("noise/") else k[:k.index("/", 6) + 1] for k in saved}
        if self.sampling == "none":
            want.add("participation")
        if keys != want:
            raise ValueError(f"state {sorted(keys)} is not this banded MF's ({sorted(want)})")
        state: MechanismState = {"released": released}
        for k, v in saved.items():
            if k.startswith("noise/"):
                if not (isinstance(v, torch.Tensor) and v.dtype == torch.float64):
                    raise ValueError(f"state {k!r} is not a float64 tensor")
                state[k] = v
        if self.sampling == "none":
            part = saved.get("participation")
            if not isinstance(part, dict) or not all(
                    isinstance(cid, str) and isinstance(h, list) and len(h) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in h)
                    and 1 <= h[0] and 1 <= h[1] <= released for cid, h in part.items()):
                raise ValueError("state 'participation' is not {client_id: [times, last round]}")
            state["participation"] = {cid: list(h) for cid, h in part.items()}
        return state

    # -- a round ---------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, round_index: int = 1) -> list[int]:
        if self.sampling == "cyclic-poisson":  # group (t-1) mod b, each member with probability q
            if not self.client_ids:
                raise ValueError("cyclic-poisson sampling needs the population's client ids")
            members = np.flatnonzero(self._groups == (round_index - 1) % self.bands)  # type: ignore[attr-defined]
            return members[rng.random(len(members)) < self.sampling_rate].tolist()
        # No sampling: the clients that check in (a stand-in for devices that come online); the
        # schema, not this choice, is what the guarantee rests on.
        return sorted(rng.choice(self.num_clients, self.clients_per_round, replace=False).tolist())

    def refusal(self, client_id: str, state: Mapping[str, object]) -> str | None:
        """Why the participation schema refuses ``client_id`` in the next round, or None."""
        t = int(state["released"]) + 1  # type: ignore[call-overload]
        if self.sampling == "cyclic-poisson":  # (the executors only ask the sampled; this holds them to it)
            g, want = group_of(client_id, self.bands), (t - 1) % self.bands
            return None if g == want else (f"participation schema: in group {g}, but round {t} samples group {want}")
        times, last = state["participation"].get(client_id, (0, None))  # type: ignore[attr-defined]
        if times >= self.participations:
            return f"participation schema: took part {times} times already (at most {self.participations})"
        if last is not None and t - last < self.bands:
            return (f"participation schema: took part in round {last}, fewer than {self.bands} rounds "
                    f"before round {t}")
        return None

    def preprocess(self, contribution: Contribution, state: Mapping[str, object],
                   reference: Mapping[str, torch.Tensor]) -> Preprocessed | str:
        """The schema (sampling "none"), then validation and the clip scale; every update weighs 1."""
        if (refused := self.refusal(contribution.client_id, state)) is not None:
            return refused
        reason, norm = validate_and_norm(contribution.update, reference)
        if reason is not None:
            return reason
        update: Mapping[str, torch.Tensor] = contribution.update  # type: ignore[assignment]
        c = self.clip_norm_value
        return Preprocessed(contribution.client_id, update, clip_factor(norm, c), 1.0, norm > c, norm)

    def release(self, aggregate: RunningSum, state: Mapping[str, object], rng: np.random.Generator | None
                ) -> tuple[Params, MechanismState]:
        """``(clipped sum + y_t) / m`` with ``y_t = (w_t - sum_j c_j y_{t-j}) / c_0``, and the new state."""
        check_clipped(aggregate, self.clip_norm_value)
        if rng is None:
            raise ValueError("a private round needs a noise generator")
        c, b = self.coefficients, self.bands
        t = int(state["released"]) + 1  # type: ignore[call-overload]
        std = self.noise_multiplier * self.clip_norm_value
        new: MechanismState = {"released": t}
        mean: Params = {}
        for name in sorted(aggregate.total):  # fixed order: a seeded generator gives the same noise
            total = aggregate.total[name]
            if total.dtype != torch.float64:
                raise ValueError("the clipped sum must be float64")
            y = torch.from_numpy(rng.standard_normal(tuple(total.shape))) * std
            for j in range(1, min(b - 1, t - 1) + 1):
                earlier = state[f"noise/{j}/{name}"]
                if not (isinstance(earlier, torch.Tensor) and earlier.shape == total.shape):
                    raise ValueError(f"the noise state of {name!r} does not match the model")
                y -= c[j] * earlier
            y /= c[0]
            mean[name] = ((total + y) / self.clients_per_round).to(aggregate.dtypes[name])
            if b > 1:
                new[f"noise/1/{name}"] = y
                for j in range(1, min(b - 2, t - 1) + 1):
                    new[f"noise/{j + 1}/{name}"] = state[f"noise/{j}/{name}"]
        if self.sampling == "none":
            if len(set(aggregate.ids)) != len(aggregate.ids) or len(aggregate.ids) != aggregate.count:
                raise ValueError("the participation schema needs each summed client's id, once")
            part = {cid: list(h) for cid, h in state["participation"].items()}  # type: ignore[attr-defined]
            for cid in aggregate.ids:
                part[cid] = [part.get(cid, [0])[0] + 1, t]
            new["participation"] = part
        return mean, new

    def guarantee_fields(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm_value, "adaptive_clipping": None,
                "matrix_factorization": {
                    "kind": "banded-mf", "bands": self.bands, "coefficients": list(self.coefficients),
                    "workload": self.workload, "rounds": self.rounds, "sampling": self.sampling,
                    "min_separation": self.bands, "max_participations": self.participations,
                    "sensitivity": self.sensitivity, "group_sampling_rate":
                        self.sampling_rate if self.sampling == "cyclic-poisson" else None}}
