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
file and, where it applies, the line (``file:line: ...``). Limits: a line (so
also a JSON-lines record) may hold at most :data:`MAX_LINE_CHARS` characters;
files are read line by line, so a longer line is refused after reading at most
about 4 MB of it, never loaded whole. Text and client ids must be valid
Unicode (a JSON ``"\\ud800"`` escape is not), and a client file's name must be
valid UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from privlm.data._common import MAX_LINE_CHARS, check_line_length, data_error, split_records
from privlm.data.corpus import ClientData, FederatedCorpus

__all__ = ["MAX_LINE_CHARS", "load_dir", "load_jsonl"]

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
        raise data_error(f"{file}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        line_no = 0
        while True:
            try:
                raw = handle.readline(_MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise data_error(f"{file}:{line_no + 1}: cannot read: {exc.strerror or exc}") from exc
            if not raw:
                return
            line_no += 1
            if len(raw) > _MAX_LINE_BYTES:
                raise data_error(f"{file}:{line_no}: line is longer than {MAX_LINE_CHARS:,} characters")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise data_error(
                    f"{file}:{line_no}: not valid UTF-8 (bad byte 0x{raw[exc.start]:02x} "
                    f"at byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from exc
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            if line_no == 1 and line.startswith("\ufeff"):
                line = line[1:]  # UTF-8 byte-order mark
            check_line_length(file, line_no, line)
            yield line_no, line


def _iter_json_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    for line_no, line in _iter_lines(file):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(f"{file}:{line_no}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
        except RecursionError as exc:
            raise data_error(f"{file}:{line_no}: invalid JSON: nested too deeply") from exc
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise data_error(f"{file}:{line_no}: invalid JSON: {_first_line(exc)}") from exc
        if not isinstance(row, dict):
            raise data_error(
                f"{file}:{line_no}: expected a JSON object per line, got {_json_type(row)}"
            )
        yield line_no, row


def _first_line(exc: Exception) -> str:
    text = str(exc)
    if "integer string conversion" in text:
        return "a number with too many digits"
    return text.splitlines()[0] if text else type(exc).__name__


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
    """``row[name]``, which must be present and a string of valid Unicode."""
    if name not in row:
        raise data_error(f"{file}:{line_no}: missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise data_error(f"{file}:{line_no}: field '{name}' must be a string, got {_json_type(value)}")
    if not _is_unicode(value):
        raise data_error(
            f"{file}:{line_no}: field '{name}' is not valid Unicode (it has a lone surrogate "
            f"such as a JSON \\ud800 escape)"
        )
    return value


def _is_unicode(text: str) -> bool:
    """False if ``text`` holds a lone surrogate, which no UTF-8 text can (the tokenizer would fail)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def _own_file(folder: Path, child: Path) -> bool:
    """Whether ``child`` is a client file of ``folder``: a regular file, or a link to one inside it.

    A link that leaves the folder (``/etc/passwd``, ``/proc/self/environ``) or anything but a
    regular file (a FIFO, a device) is refused, naming it: data is read only from where it was put.
    """
    if child.is_symlink():
        target = child.resolve()
        if not target.is_relative_to(folder.resolve()):
            raise data_error(f"{child}: a link to {target}, outside the data folder; copy the file in instead")
    if child.is_dir():
        return False
    if not child.is_file():
        raise data_error(f"{child}: not a regular file")
    return True


def load_dir(path: Path) -> FederatedCorpus:
    """Load a directory of ``<client_id>.txt`` / ``<client_id>.jsonl`` files, one per client."""
    path = Path(path)
    if not path.exists():
        raise data_error(f"data directory not found: {path}")
    if not path.is_dir():
        raise data_error(f"{path} is not a directory (data.source 'dir' wants a directory of <client_id>.txt or .jsonl files)")
    try:
        files = sorted(
            child
            for child in path.iterdir()
            if child.suffix in _SUFFIXES and not child.name.startswith(".") and _own_file(path, child)
        )
    except OSError as exc:
        raise data_error(f"{path}: cannot list the directory: {exc.strerror or exc}") from exc
    if not files:
        raise data_error(f"no <client_id>.txt or <client_id>.jsonl files found in {path}")

    seen: dict[str, Path] = {}
    clients: list[ClientData] = []
    n_records = 0
    for file in files:
        client_id = file.stem
        if not _is_unicode(client_id):
            raise data_error(f"{file}: the file name is not valid UTF-8; rename the file (its name is the client id)")
        if client_id in seen:
            raise data_error(f"{file}: client '{client_id}' also has the file {seen[client_id]}; keep one file per client")
        seen[client_id] = file
        records = _read_txt_records(file) if file.suffix == ".txt" else _read_jsonl_records(file)
        if not records:
            raise data_error(f"{file}: client '{client_id}' has no text (the file has no non-blank records)")
        n_records += len(records)
        clients.append(_client(client_id, records))
    clients.sort(key=lambda c: c.client_id)
    info = {"source": "dir", "records": n_records, "clients_without_test": sum(1 for c in clients if not c.test)}
    return FederatedCorpus(name=path.name or str(path), clients=tuple(clients), info=info)


def load_jsonl(path: Path) -> FederatedCorpus:
    """Load one JSON-lines file whose rows are ``{"client_id": ..., "text": ...}``."""
    path = Path(path)
    if not path.exists():
        raise data_error(f"data file not found: {path}")
    if not path.is_file():
        raise data_error(f"{path} is not a file (data.source 'jsonl' wants one .jsonl file)")

    by_client: dict[str, list[str]] = {}
    for line_no, row in _iter_json_rows(path):
        client_id = _string_field(path, line_no, row, "client_id")
        text = _string_field(path, line_no, row, "text")
        if not client_id.strip():
            raise data_error(f"{path}:{line_no}: field 'client_id' is empty")
        records = by_client.setdefault(client_id, [])
        if text.strip():
            records.append(text)
    if not by_client:
        raise data_error(f"{path}: no rows found (expected JSON lines with 'client_id' and 'text')")

    clients: list[ClientData] = []
    for client_id, records in sorted(by_client.items()):
        if not records:
            raise data_error(f"{path}: client {client_id!r} has no text (all its rows have a blank 'text')")
        clients.append(_client(client_id, records))
    info = {
        "source": "jsonl",
        "records": sum(len(r) for r in by_client.values()),
        "clients_without_test": sum(1 for c in clients if not c.test),
    }
    return FederatedCorpus(name=path.stem, clients=tuple(clients), info=info)
