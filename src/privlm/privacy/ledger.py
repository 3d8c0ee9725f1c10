"""The ledger: an append-only list of dp-accounting events, one per round run.

Entries are plain ``dp_accounting`` event records (frozen ``attrs`` classes)
with the round they paid for. They are stored as JSON (no pickle): each event
becomes ``{"class": "PoissonSampledDpEvent", "sampling_probability": ...,
"event": {"class": "GaussianDpEvent", "noise_multiplier": ...}}``. Loading only
accepts the event classes privlm writes (an allow-list), so a tampered file
cannot make us import or call anything else. (``NoOpDpEvent`` is a round of banded
matrix factorization past the last one that can add to a user's sensitivity.)

Integrity: each entry carries ``digest``, a SHA-256 hash chain over the entries
so far (:func:`chain_digest`). Loading recomputes the chain and names the first
entry that does not match, so an edited, inserted or removed entry is refused; the
resume state and ``ledger-head.json`` record the chain head they were written
after, so a stale or truncated ledger, or one whose chain was recomputed without
also forging both of those, does not extend it and is refused too. The chain has
no key: it guards against accidents and careless edits, not against someone who
can rewrite every file of the run directory consistently.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import attr
import dp_accounting
from dp_accounting import dp_event

# Event classes a ledger may hold: the ones privlm's mechanisms produce. Anything else
# in a file is an error (see also check_run_event for the shapes a run may hold).
_ALLOWED = {
    cls.__name__: cls
    for cls in (
        dp_event.NonPrivateDpEvent,
        dp_event.NoOpDpEvent,
        dp_event.GaussianDpEvent,
        dp_event.PoissonSampledDpEvent,
        dp_event.SelfComposedDpEvent,
    )
}

GENESIS = ""  # the chain head of an empty ledger


def chain_digest(previous: str, entry: dict) -> str:
    """SHA-256 over the previous head and the entry's canonical JSON.

    Without its digest, and without ``lost``: marking a paid entry lost (on resume) only
    annotates it (it stays counted), so it must not change the chain that the resume
    state and ledger-head.json were written after.
    """
    body = {k: v for k, v in entry.items() if k not in ("digest", "lost")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(f"{previous}\n{text}".encode()).hexdigest()


def check_run_event(event: dp_accounting.DpEvent, mode: str) -> str | None:
    """Why ``event`` cannot be an entry of a privlm run in ``mode``, or None.

    user: ``PoissonSampled(q, Gaussian(z))`` (one DP-FedAvg round, or one participation
    group's round of amplified banded MF), or, banded MF without sampling, ``Gaussian(z)``
    or ``NoOp``; example: ``PoissonSampled(q, Gaussian(z))``, or it self-composed over a
    round's DP-SGD steps; none: ``NonPrivate``. Values must be finite and in range
    (0 < q <= 1, z > 0, steps >= 1).
    """
    if mode == "none":
        return None if isinstance(event, dp_event.NonPrivateDpEvent) else f"{type(event).__name__} in a non-private run"
    if mode == "user" and isinstance(event, dp_event.NoOpDpEvent):
        return None
    if mode == "user" and isinstance(event, dp_event.GaussianDpEvent):
        z = event.noise_multiplier
        return None if _real(z) and z > 0 else f"noise multiplier {z!r} is not a finite number > 0"
    if mode == "example" and isinstance(event, dp_event.SelfComposedDpEvent):
        if not (isinstance(event.count, int) and not isinstance(event.count, bool) and event.count >= 1):
            return f"step count {event.count!r} is not a positive integer"
        event = event.event
    if not (isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent)):
        return f"{type(event).__name__} is not a Poisson-sampled Gaussian mechanism"
    q, z = event.sampling_probability, event.event.noise_multiplier
    if not (_real(q) and 0 < q <= 1):
        return f"sampling probability {q!r} is not in (0, 1]"
    if not (_real(z) and z > 0):
        return f"noise multiplier {z!r} is not a finite number > 0"
    return None


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def event_to_dict(event: dp_accounting.DpEvent) -> dict:
    """JSON-ready dict of a dp-accounting event (recursively)."""
    name = type(event).__name__
    if name not in _ALLOWED:
        raise ValueError(f"event type {name} is not supported in a ledger")
    out: dict = {"class": name}
    for key, value in attr.asdict(event, recurse=False).items():
        if isinstance(value, dp_accounting.DpEvent):
            value = event_to_dict(value)
        elif isinstance(value, (list, tuple)):
            value = [event_to_dict(v) if isinstance(v, dp_accounting.DpEvent) else v for v in value]
        out[key] = value
    return out


def event_from_dict(data: object) -> dp_accounting.DpEvent:
    """Inverse of :func:`event_to_dict`; refuses classes outside the allow-list."""
    if not isinstance(data, dict) or not isinstance(data.get("class"), str):
        raise ValueError(f"not a DP event record: {data!r:.80}")
    cls = _ALLOWED.get(data["class"])
    if cls is None:
        raise ValueError(f"unsupported DP event class {data['class']!r}")
    kwargs = {}
    for f in attr.fields(cls):
        if f.name not in data:
            raise ValueError(f"{data['class']} record lacks field {f.name!r}")
        value = data[f.name]
        if isinstance(value, dict):
            value = event_from_dict(value)
        elif isinstance(value, list):
            value = [event_from_dict(v) if isinstance(v, dict) else v for v in value]
        kwargs[f.name] = value
    extra = set(data) - {"class"} - {f.name for f in attr.fields(cls)}
    if extra:
        raise ValueError(f"{data['class']} record has unknown fields {sorted(extra)}")
    return cls(**kwargs)


def compose_events(events: Iterable[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    """All events as one ``ComposedDpEvent``, runs of equal events self-composed.

    Run-length encoding makes PLD composition of thousands of identical rounds
    fast (one self-composition instead of thousands of convolutions) and is
    exact: composing ``k`` copies of an event is what
    ``SelfComposedDpEvent(event, k)`` means. Two more exact identities (banded MF's
    ledgers): Gaussian mechanisms compose to one, ``Gaussian(z_1) o ... o Gaussian(z_n) =
    Gaussian((sum z_i^-2)^-1/2)`` (privacy-loss means and variances add), which comes
    first; ``NoOp`` events are dropped.
    """
    events = list(events)
    gaussians = [e.noise_multiplier for e in events if isinstance(e, dp_event.GaussianDpEvent)]
    runs: list[list] = []
    if gaussians:
        runs.append([dp_accounting.GaussianDpEvent(math.fsum(z**-2 for z in gaussians) ** -0.5), 1])
    for e in events:
        if isinstance(e, (dp_event.GaussianDpEvent, dp_event.NoOpDpEvent)):
            continue
        if runs and runs[-1][0] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    parts = [ev if k == 1 else dp_accounting.SelfComposedDpEvent(ev, k) for ev, k in runs]
    return dp_accounting.ComposedDpEvent(parts)


@dataclass(frozen=True)
class LedgerEntry:
    """One round's privacy cost: the round number and what the mechanism was.

    ``lost`` marks a round that was paid for (its entry was durable) but whose
    result a crash destroyed before it was saved, in a run with secure noise:
    it stays in the ledger and counts towards epsilon (its noisy output may have
    existed), and the round is run again, with fresh noise, under a new entry.
    """

    round: int
    event: dp_accounting.DpEvent
    lost: bool = False
    silo: str | None = None  # example-level mode: whose records paid (None: the user population)
    clip_norm: float | None = None  # user-level, fixed clipping: the C the round clipped to (for the text)
    group: int | None = None  # banded MF with cyclic sampling: the participation group charged

    def to_dict(self) -> dict:
        d: dict = {"round": self.round, "event": event_to_dict(self.event)}
        if self.silo is not None:
            d["silo"] = self.silo
        if self.group is not None:
            d["group"] = self.group
        if self.clip_norm is not None:
            d["clip_norm"] = self.clip_norm
        if self.lost:
            d["lost"] = True
        return d

    @classmethod
    def from_dict(cls, data: dict) -> LedgerEntry:
        rnd = data.get("round") if isinstance(data, dict) else None
        if not isinstance(rnd, int) or isinstance(rnd, bool):
            raise ValueError(f"ledger entry lacks an integer 'round': {data!r:.80}")
        lost = data.get("lost", False)
        if not isinstance(lost, bool):
            raise ValueError(f"ledger entry of round {rnd}: 'lost' must be true or false")
        silo = data.get("silo")
        if silo is not None and not isinstance(silo, str):
            raise ValueError(f"ledger entry of round {rnd}: 'silo' must be a string")
        clip = data.get("clip_norm")
        if clip is not None and not (_real(clip) and clip > 0):
            raise ValueError(f"ledger entry of round {rnd}: 'clip_norm' must be a number > 0")
        group = data.get("group")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
            raise ValueError(f"ledger entry of round {rnd}: 'group' must be an integer >= 0")
        extra = set(data) - {"round", "event", "lost", "silo", "clip_norm", "group", "digest"}
        if extra:
            raise ValueError(f"ledger entry of round {rnd} has unknown fields {sorted(extra)}")
        return cls(round=rnd, event=event_from_dict(data.get("event")), lost=lost, silo=silo,
                   clip_norm=None if clip is None else float(clip), group=group)


class Ledger:
    """Append-only sequence of :class:`LedgerEntry`.

    The ledger itself holds no numbers of its own: epsilon is always computed
    by composing its events (:func:`privlm.privacy.accountant.epsilon`).
    Durability (writing it to disk before parameters are released) is the
    runtime's job; see ``privlm.rundir``.
    """

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: list[LedgerEntry] = []
        self._digests: list[str] = []  # _digests[i]: the chain head after entry i
        self._json: list[str] = []  # entry i as stored (JSON text), kept so a write costs a join
        for e in entries:
            self.append(e.round, e.event, e.lost, e.silo, e.clip_norm, e.group)

    def digest(self, entries: int | None = None) -> str:
        """The chain head after the first ``entries`` entries (all by default)."""
        n = len(self._entries) if entries is None else entries
        if not 0 <= n <= len(self._entries):
            raise ValueError(f"the ledger has {len(self._entries)} entries, not {n}")
        return self._digests[n - 1] if n else GENESIS

    def append(self, round_index: int, event: dp_accounting.DpEvent, lost: bool = False,
               silo: str | None = None, clip_norm: float | None = None, group: int | None = None) -> LedgerEntry:
        """Add a round's cost. Rounds increase; a round repeats only after a lost entry,
        or for another silo (example-level mode: one entry per silo per round). Entries
        charged to participation groups are all so charged (one account per group)."""
        if self._entries:
            last = self._entries[-1]
            if (group is None) != (last.group is None):
                raise ValueError("a ledger's entries are charged to participation groups all or none")
            other_silo = silo is not None and last.silo is not None and silo != last.silo
            if round_index < last.round or (round_index == last.round and not (last.lost or other_silo)):
                raise ValueError(f"ledger rounds must increase: got {round_index} after {last.round}")
        entry = LedgerEntry(round_index, event, lost, silo, clip_norm, group)
        d = entry.to_dict()
        self._digests.append(chain_digest(self.digest(), d))
        self._entries.append(entry)
        self._json.append(json.dumps({**d, "digest": self._digests[-1]}, allow_nan=False))
        return entry

    def mark_lost_after(self, round_index: int) -> list[LedgerEntry]:
        """Mark every entry for a round after ``round_index`` as lost (still counted).

        Used on resume with secure noise: those rounds were paid for but their
        results were never saved, so they will be run again under new entries.
        """
        marked = []
        for i, e in enumerate(self._entries):
            if e.round > round_index and not e.lost:
                self._entries[i] = LedgerEntry(e.round, e.event, lost=True, silo=e.silo, clip_norm=e.clip_norm,
                                               group=e.group)
                self._json[i] = json.dumps({**self._entries[i].to_dict(), "digest": self._digests[i]})
                marked.append(self._entries[i])
        return marked

    def entry_for(self, round_index: int, silo: str | None = None) -> LedgerEntry | None:
        """The live (not lost) entry paying for ``round_index`` (for ``silo``), if any."""
        for e in reversed(self._entries):
            if e.round == round_index and not e.lost and e.silo == silo:
                return e
        return None

    def silos(self) -> list[str]:
        """The silos with entries, in first-seen order (example-level mode)."""
        return list(dict.fromkeys(e.silo for e in self._entries if e.silo is not None))

    def for_silo(self, silo: str) -> list[dp_accounting.DpEvent]:
        """The events that silo ``silo``'s records paid (lost ones included)."""
        return [e.event for e in self._entries if e.silo == silo]

    def groups(self) -> list[int]:
        """The participation groups charged (banded MF with cyclic sampling), in first-seen order."""
        return list(dict.fromkeys(e.group for e in self._entries if e.group is not None))

    def for_group(self, group: int) -> list[dp_accounting.DpEvent]:
        """The events charged to participation group ``group`` (lost ones included)."""
        return [e.event for e in self._entries if e.group == group]

    @property
    def lost(self) -> int:
        return sum(e.lost for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self._entries)

    @property
    def events(self) -> list[dp_accounting.DpEvent]:
        return [e.event for e in self._entries]

    def to_list(self) -> list[dict]:
        return [{**e.to_dict(), "digest": d} for e, d in zip(self._entries, self._digests)]

    def to_json(self) -> str:
        """``json.dumps(self.to_list())``, one entry a line, from text kept since each append."""
        return "[\n" + ",\n".join(self._json) + "\n]" if self._json else "[]"

    def segments(self) -> list[tuple[int, int, LedgerEntry]]:
        """Runs of entries with the same mechanism: (first round, last round, an entry of the run)."""
        out: list[tuple[int, int, LedgerEntry]] = []
        for e in self._entries:
            if out and (out[-1][2].event, out[-1][2].clip_norm, out[-1][2].silo, out[-1][2].group) == \
                    (e.event, e.clip_norm, e.silo, e.group):
                out[-1] = (out[-1][0], e.round, out[-1][2])
            else:
                out.append((e.round, e.round, e))
        return out

    @classmethod
    def from_list(cls, data: object, mode: str | None = None) -> Ledger:
        """Load a stored ledger, verifying its hash chain (and, given ``mode``, that every
        entry is an event of that mode's mechanism). Errors name the entry."""
        if not isinstance(data, list):
            raise ValueError("ledger must be a list of entries")
        ledger = cls()
        for i, item in enumerate(data, 1):
            try:
                entry = LedgerEntry.from_dict(item)
            except (ValueError, TypeError) as e:
                raise ValueError(f"entry {i}: {e}") from None
            where = f"entry {i} (round {entry.round})"
            if mode is not None and (why := check_run_event(entry.event, mode)) is not None:
                raise ValueError(f"{where}: {why}, not an event of a {mode!r} run's mechanism")
            if mode is not None and (entry.silo is not None) != (mode == "example"):
                raise ValueError(f"{where}: {'no' if mode == 'example' else 'a'} silo in a {mode!r} run's ledger")
            if mode is not None and entry.group is not None and mode != "user":
                raise ValueError(f"{where}: a participation group in a {mode!r} run's ledger")
            if "digest" not in item:
                raise ValueError(f"{where}: no digest (a ledger written before privlm kept a hash chain, or an "
                                 "entry added by hand); privlm will not resume or account it")
            try:
                ledger.append(entry.round, entry.event, entry.lost, entry.silo, entry.clip_norm, entry.group)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if item.get("digest") != ledger.digest():
                raise ValueError(f"{where}: its digest does not match its content and the entries "
                                 "before it (an edited, inserted or removed entry)")
        return ledger
