"""The ledger: an append-only list of dp-accounting events, one per round run.

Entries are plain ``dp_accounting`` event records (frozen ``attrs`` classes)
with the round they paid for. They are stored as JSON (no pickle): each event
becomes ``{"class": "PoissonSampledDpEvent", "sampling_probability": ...,
"event": {"class": "GaussianDpEvent", "noise_multiplier": ...}}``. Loading only
accepts event classes from ``dp_accounting.dp_event`` on an allow-list, so a
tampered file cannot make us import or call anything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import attr
import dp_accounting
from dp_accounting import dp_event

# Event classes a ledger may hold. Anything else in a file is an error.
_ALLOWED = {
    cls.__name__: cls
    for cls in (
        dp_event.NoOpDpEvent,
        dp_event.NonPrivateDpEvent,
        dp_event.GaussianDpEvent,
        dp_event.PoissonSampledDpEvent,
        dp_event.SelfComposedDpEvent,
        dp_event.ComposedDpEvent,
        dp_event.SampledWithoutReplacementDpEvent,
        dp_event.SampledWithReplacementDpEvent,
    )
}


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


def event_from_dict(data: dict) -> dp_accounting.DpEvent:
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
    ``SelfComposedDpEvent(event, k)`` means.
    """
    runs: list[list] = []
    for e in events:
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

    def to_dict(self) -> dict:
        d: dict = {"round": self.round, "event": event_to_dict(self.event)}
        if self.silo is not None:
            d["silo"] = self.silo
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
        extra = set(data) - {"round", "event", "lost", "silo"}
        if extra:
            raise ValueError(f"ledger entry of round {rnd} has unknown fields {sorted(extra)}")
        return cls(round=rnd, event=event_from_dict(data.get("event")), lost=lost, silo=silo)


class Ledger:
    """Append-only sequence of :class:`LedgerEntry`.

    The ledger itself holds no numbers of its own: epsilon is always computed
    by composing its events (:func:`privlm.privacy.accountant.epsilon`).
    Durability (writing it to disk before parameters are released) is the
    runtime's job; see ``privlm.rundir``.
    """

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self._entries: list[LedgerEntry] = list(entries)

    def append(self, round_index: int, event: dp_accounting.DpEvent, lost: bool = False,
               silo: str | None = None) -> LedgerEntry:
        """Add a round's cost. Rounds increase; a round repeats only after a lost entry,
        or for another silo (example-level mode: one entry per silo per round)."""
        if self._entries:
            last = self._entries[-1]
            other_silo = silo is not None and last.silo is not None and silo != last.silo
            if round_index < last.round or (round_index == last.round and not (last.lost or other_silo)):
                raise ValueError(f"ledger rounds must increase: got {round_index} after {last.round}")
        entry = LedgerEntry(round_index, event, lost, silo)
        self._entries.append(entry)
        return entry

    def mark_lost_after(self, round_index: int) -> list[LedgerEntry]:
        """Mark every entry for a round after ``round_index`` as lost (still counted).

        Used on resume with secure noise: those rounds were paid for but their
        results were never saved, so they will be run again under new entries.
        """
        marked = []
        for i, e in enumerate(self._entries):
            if e.round > round_index and not e.lost:
                self._entries[i] = LedgerEntry(e.round, e.event, lost=True, silo=e.silo)
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
        return [e.to_dict() for e in self._entries]

    @classmethod
    def from_list(cls, data: list) -> Ledger:
        if not isinstance(data, list):
            raise ValueError("ledger must be a list of entries")
        ledger = cls()
        for item in data:
            entry = LedgerEntry.from_dict(item)
            ledger.append(entry.round, entry.event, entry.lost, entry.silo)
        return ledger
