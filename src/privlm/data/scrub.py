"""Client-side PII scrubbing of a federated corpus (``[data.scrub]``).

Scrubbing runs where the data lives: :func:`scrub_client` takes one client's
text and returns its scrubbed text plus the number of values replaced per
entity type. Only those counts leave the client; the in-process simulation
adds them up for the report, and a Flower ClientApp calls the same function
on its own partition. :func:`scrub_corpus` runs :func:`scrub_client` for every
client of an in-process simulation, spread over the CPU cores.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from typing import TYPE_CHECKING

from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.errors import DataError
from privlm.pii import Detector, Scrubber

if TYPE_CHECKING:
    from privlm.config import RunConfig

_PARALLEL_MIN_CLIENTS = 200  # below this a worker pool costs more than it saves
_CHUNK = 64  # clients per work item
_LINES_PER_CHUNK = 2000  # texts per work item of `privlm scrub`


@dataclass(frozen=True)
class ScrubSettings:
    entities: tuple[str, ...] | None = None  # None: the detector's defaults
    operator: str = "placeholder"
    spacy_model: str | None = None
    seed: int | None = None  # pseudonym keys from (seed, client id): tests only; None = random per client


def settings_for_run(cfg: RunConfig) -> ScrubSettings | None:
    """The scrubbing a run's clients do (None: scrubbing is off)."""
    if not cfg.data.scrub_enabled:
        return None
    s = cfg.data.scrub
    return ScrubSettings(tuple(s.entities) if s.entities else None, s.operator, s.spacy_model,
                         cfg.seed if cfg.privacy.seeded_noise else None)


def scrub_client(client: ClientData, detector: Detector, settings: ScrubSettings) -> tuple[ClientData, Counter[str]]:
    """Scrub one client's train and test text; the counts are all that leaves the client."""
    salt = None
    if settings.seed is not None:
        salt = hashlib.sha256(f"privlm-scrub:{settings.seed}:{client.client_id}".encode()).digest()[:16]
    scrubber = Scrubber(detector, settings.operator, salt)  # one per client: pseudonyms never cross clients
    counts: Counter[str] = Counter()
    texts = []
    for text in (client.train, client.test):
        lines = text.split("\n")
        scrubbed = []
        for line, line_counts in scrubber.scrub_many(lines):
            scrubbed.append(line)
            counts.update(line_counts)
        texts.append("\n".join(scrubbed))
    return ClientData(client.client_id, texts[0], texts[1]), counts


_worker_detector: Detector | None = None


def _init_worker(settings: ScrubSettings) -> None:
    global _worker_detector
    _worker_detector = Detector(settings.entities, settings.spacy_model)


def _scrub_chunk(clients: Sequence[ClientData], settings: ScrubSettings) -> list[tuple[ClientData, Counter[str]]]:
    assert _worker_detector is not None
    return [scrub_client(c, _worker_detector, settings) for c in clients]


def scrub_corpus(corpus: FederatedCorpus, settings: ScrubSettings, progress: bool = True,
                 workers: int | None = None) -> tuple[FederatedCorpus, dict[str, int]]:
    """Every client scrubbed by :func:`scrub_client`; returns the corpus and the summed counts.

    ``workers`` processes (default: the CPU cores) share the clients of a large corpus.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    workers = workers or len(os.sched_getaffinity(0))
    clients = list(corpus.clients)
    done: list[ClientData] = []
    total: Counter[str] = Counter()
    bar = Progress(TextColumn("scrubbing PII"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    with bar:
        task = bar.add_task("scrub", total=len(clients))
        if workers > 1 and len(clients) >= _PARALLEL_MIN_CLIENTS:
            chunks = [clients[i:i + _CHUNK] for i in range(0, len(clients), _CHUNK)]
            # fork: spawn would re-run a user's __main__; the workers use no torch (no thread-pool hazard).
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                                     initargs=(settings,)) as pool:
                for results in pool.map(_scrub_chunk, chunks, [settings] * len(chunks)):
                    for client, counts in results:
                        done.append(client)
                        total.update(counts)
                    bar.advance(task, len(results))
        else:
            detector = Detector(settings.entities, settings.spacy_model)
            for c in clients:
                client, counts = scrub_client(c, detector, settings)
                done.append(client)
                total.update(counts)
                bar.advance(task)
    counts = dict(sorted(total.items()))
    info = {**corpus.info, "scrubbed": {"operator": settings.operator, "counts": counts}}
    return FederatedCorpus(corpus.name, tuple(done), info), counts


# --------------------------------------------------------------------------- files


def _scrub_items(items: Sequence[tuple[bytes, str]], settings: ScrubSettings,
                 detector: Detector | None = None) -> list[tuple[str, Counter[str]]]:
    """``(salt, text)`` pairs: one scrubber per salt, so a salt is one client's pseudonym key.

    Consecutive texts with the same salt go through the detector as one batch.
    """
    detector = detector or _worker_detector
    assert detector is not None
    scrubbers: dict[bytes, Scrubber] = {}
    out: list[tuple[str, Counter[str]]] = []
    for salt, group in itertools.groupby(items, key=lambda item: item[0]):
        scrubber = scrubbers.get(salt)
        if scrubber is None:
            scrubber = scrubbers[salt] = Scrubber(detector, settings.operator, salt)
        out.extend(scrubber.scrub_many([text for _, text in group]))
    return out


def _read_file(path: Path, fmt: str) -> tuple[list[str], list[dict] | None]:
    """The texts of one input file (its lines, or its rows' ``text``) and, for JSONL, its rows."""
    from privlm.data._common import check_line_length, read_utf8
    from privlm.data.userdata import _iter_json_rows, _string_field

    if fmt == "txt":
        lines = read_utf8(path).split("\n")
        for i, line in enumerate(lines, 1):
            check_line_length(path, i, line)
        return lines, None
    rows, texts = [], []
    for line_no, row in _iter_json_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object with a 'text' field")
        texts.append(_string_field(path, line_no, row, "text"))
        if "client_id" in row:
            _string_field(path, line_no, row, "client_id")
        rows.append(row)
    return texts, rows


def scrub_path(src: Path, dst: Path, fmt: str = "txt", settings: ScrubSettings | None = None,
               progress: bool = True, workers: int | None = None) -> dict[str, int]:
    """Scrub a ``.txt``/``.jsonl`` file, or every such file under a directory, into ``dst``.

    Text files are scrubbed line by line; JSON-lines files row by row (the
    ``text`` field; other fields are kept). Pseudonyms are consistent within a
    file, or within a ``client_id`` of a JSON-lines file. Existing outputs are
    never overwritten; each output is written atomically. Returns the counts
    per entity type.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from privlm.rundir import atomic_write

    settings = settings or ScrubSettings()
    src, dst = Path(src), Path(dst)
    if fmt not in ("txt", "jsonl"):
        raise DataError(f"--format: must be txt or jsonl (got {fmt!r})")
    if not src.exists():
        raise DataError(f"{src}: not found")
    if src.is_dir():
        files = sorted(p for p in src.rglob(f"*.{fmt}") if p.is_file())
        if not files:
            raise DataError(f"{src}: no .{fmt} files in this directory")
        pairs = [(f, dst / f.relative_to(src)) for f in files]
    else:
        pairs = [(src, dst)]
    for f, out in pairs:
        if out.exists():
            raise DataError(f"{out}: already exists; privlm scrub never overwrites a file")
        if out.resolve() == f.resolve():
            raise DataError(f"{out}: is the input file")

    # (salt, text) work items; a salt per file, or per client_id in JSON lines.
    loaded = []
    items: list[tuple[bytes, str]] = []
    for f, _ in pairs:
        texts, rows = _read_file(f, fmt)
        file_salt = secrets.token_bytes(16)
        for i, text in enumerate(texts):
            cid = rows[i].get("client_id") if rows is not None else None
            salt = file_salt if cid is None else hmac.new(file_salt, cid.encode(), hashlib.sha256).digest()[:16]
            items.append((salt, text))
        loaded.append((len(texts), rows))

    workers = workers or len(os.sched_getaffinity(0))
    chunks = [items[i:i + _LINES_PER_CHUNK] for i in range(0, len(items), _LINES_PER_CHUNK)]
    results: list[tuple[str, Counter[str]]] = []
    bar = Progress(TextColumn("scrubbing"), BarColumn(), MofNCompleteColumn(), TextColumn("texts"),
                   TimeRemainingColumn(), disable=not progress, transient=True)
    with bar:
        task = bar.add_task("scrub", total=len(items))
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                                     initargs=(settings,)) as pool:
                for part in pool.map(_scrub_items, chunks, [settings] * len(chunks)):
                    results.extend(part)
                    bar.advance(task, len(part))
        else:
            detector = Detector(settings.entities, settings.spacy_model)
            for chunk in chunks:
                results.extend(_scrub_items(chunk, settings, detector))
                bar.advance(task, len(chunk))

    total: Counter[str] = Counter()
    pos = 0
    for (_, out), (n, rows) in zip(pairs, loaded, strict=True):
        part = results[pos:pos + n]
        pos += n
        for _, counts in part:
            total.update(counts)
        if rows is None:
            data = "\n".join(text for text, _ in part)
        else:
            data = "".join(json.dumps({**row, "text": text}, ensure_ascii=False) + "\n"
                           for row, (text, _) in zip(rows, part, strict=True))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, data.encode("utf-8"))
    return dict(sorted(total.items()))
