"""Your own text as a federated corpus.

Two layouts are read:

* :func:`load_dir` - a directory with one file per client (data owner):

  - ``<client_id>.txt``: the client's text; every non-blank line is one record.
  - ``<client_id>.jsonl``: one JSON object per line with a string field
    ``text``; every row is one record (its text may span several lines).

  Other files, hidden files and sub-directories are ignored.

* :func:`load_jsonl` - one JSON-lines file whose rows hold string fields
  ``client_id`` and ``text``; rows are grouped by ``client_id`` in file order.

Records are kept in file order. Each client's first 80% of records train and
the last 20% (at least one) test, as in LEAF. A client with a single record
keeps it for training and has an empty test text (it then adds nothing to
held-out metrics). Blank lines, and rows whose ``text`` is blank, are not
records; a client with no records at all is an error.

All problems raise :class:`DataError` with a one-line message that names the
file and, where it applies, the line (``file:line: ...``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from privlm.data._common import split_records
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.errors import DataError

#: Longest accepted line, in characters.
MAX_LINE_CHARS = 1_000_000
# A line of at most MAX_LINE_CHARS characters is at most 4 bytes a character
# in UTF-8, plus a "\r\n" terminator; reading one byte more detects overlong lines
# without loading them whole.
_MAX_LINE_BYTES = 4 * MAX_LINE_CHARS + 2

_SUFFIXES = (".txt", ".jsonl")


def _iter_lines(file: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for a UTF-8 file, line terminators removed."""
    try:
        handle = file.open("rb")
    except OSError as exc:
        raise DataError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        line_no = 0
        while True:
            raw = handle.readline(_MAX_LINE_BYTES + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > _MAX_LINE_BYTES:
                raise DataError(f"{file}:{line_no}: line is longer than {MAX_LINE_CHARS:,} characters")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{file}:{line_no}: not valid UTF-8 (bad byte 0x{raw[exc.start]:02x} "
                    f"at byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from exc
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            if line_no == 1 and line.startswith("\ufeff"):
                line = line[1:]  # UTF-8 byte-order mark
            if len(line) > MAX_LINE_CHARS:
                raise DataError(f"{file}:{line_no}: line is longer than {MAX_LINE_CHARS:,} characters")
            yield line_no, line


def _iter_json_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    for line_no, line in _iter_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{line_no}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
        if not isinstance(row, dict):
            raise DataError(
                f"{file}:{line_no}: expected a JSON object per line, got {_json_type(row)}"
            )
        yield line_no, row


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _string_field(file: Path, line_no: int, row: dict, name: str) -> str:
    """``row[name]``, which must be present and a string."""
    if name not in row:
        raise DataError(f"{file}:{line_no}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{file}:{line_no}: field '{name}' must be a string, got {_json_type(value)}")
    return value


def _client(client_id: str, records: list[str]) -> ClientData:
    """Split one client's records (at least one) into train and test texts."""
    if len(records) == 1:
        return ClientData(client_id=client_id, train=records[0], test="")
    train, test = split_records(records)
    return ClientData(client_id=client_id, train=train, test=test)


def _read_txt_records(file: Path) -> list[str]:
    return [line for _, line in _iter_lines(file) if line.strip()]


def _read_jsonl_records(file: Path) -> list[str]:
    records = []
    for line_no, row in _iter_json_rows(file):
        text = _string_field(file, line_no, row, "text")
        if text.strip():
            records.append(text)
    return records


def load_dir(path: Path) -> FederatedCorpus:
    """Load a directory of ``<client_id>.txt`` / ``<client_id>.jsonl`` files, one per client."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data directory not found: {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a directory (data.source 'dir' wants a directory of <client_id>.txt or .jsonl files)")
    files = sorted(
        child
        for child in path.iterdir()
        if child.suffix in _SUFFIXES and not child.name.startswith(".") and child.is_file()
    )
    if not files:
        raise DataError(f"no <client_id>.txt or <client_id>.jsonl files found in {path}")

    seen: dict[str, Path] = {}
    clients: list[ClientData] = []
    n_records = 0
    for file in files:
        client_id = file.stem
        if client_id in seen:
            raise DataError(f"{file}: client '{client_id}' also has the file {seen[client_id]}; keep one file per client")
        seen[client_id] = file
        records = _read_txt_records(file) if file.suffix == ".txt" else _read_jsonl_records(file)
        if not records:
            raise DataError(f"{file}: client '{client_id}' has no text (the file has no non-blank records)")
        n_records += len(records)
        clients.append(_client(client_id, records))
    clients.sort(key=lambda c: c.client_id)
    info = {"source": "dir", "records": n_records, "clients_without_test": sum(1 for c in clients if not c.test)}
    return FederatedCorpus(name=path.name or str(path), clients=tuple(clients), info=info)


def load_jsonl(path: Path) -> FederatedCorpus:
    """Load one JSON-lines file whose rows are ``{"client_id": ..., "text": ...}``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file (data.source 'jsonl' wants one .jsonl file)")

    by_client: dict[str, list[str]] = {}
    for line_no, row in _iter_json_rows(path):
        client_id = _string_field(path, line_no, row, "client_id")
        text = _string_field(path, line_no, row, "text")
        if not client_id.strip():
            raise DataError(f"{path}:{line_no}: field 'client_id' is empty")
        records = by_client.setdefault(client_id, [])
        if text.strip():
            records.append(text)
    if not by_client:
        raise DataError(f"{path}: no rows found (expected JSON lines with 'client_id' and 'text')")

    clients: list[ClientData] = []
    for client_id, records in sorted(by_client.items()):
        if not records:
            raise DataError(f"{path}: client '{client_id}' has no text (all its rows have a blank 'text')")
        clients.append(_client(client_id, records))
    info = {
        "source": "jsonl",
        "records": sum(len(r) for r in by_client.values()),
        "clients_without_test": sum(1 for c in clients if not c.test),
    }
    return FederatedCorpus(name=path.stem, clients=tuple(clients), info=info)
