"""Pieces shared by the data sources: reading a text file, limits, and the train/test split.

Limits on input (each breach is a :class:`DataError` naming the file, and the
line where one applies):

* :data:`MAX_LINE_CHARS` - the longest line (or JSON-lines record) accepted,
  1,000,000 characters. Real text has lines of at most some thousands of
  characters; a longer one is almost always a wrong file (a binary, a
  minified dump), and refusing it keeps a single 50 MB "line" from being
  taken as one record.
* :data:`MAX_FILE_BYTES` - the largest file read whole (the Shakespeare
  formats), 1 GiB. Directory and JSON-lines sources are read line by line and
  have no size limit beyond the line limit.

The split:

LEAF and McMahan et al. (2017) hold out the *last* part of each client's text:
the first 80% of a client's records (lines, speeches, notes) train, the rest
test, and every client keeps at least one test record. Keeping the order (not
shuffling) means the test text is "what this data owner wrote later".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from privlm.errors import DataError

#: Longest accepted line (or JSON-lines record), in characters.
MAX_LINE_CHARS = 1_000_000
#: Largest file read whole into memory, in bytes.
MAX_FILE_BYTES = 1 << 30


def printable(text: str) -> str:
    """``text`` fit for a one-line message: line breaks, control characters and
    undecodable file-name bytes (lone surrogates) are shown as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def data_error(message: str) -> DataError:
    """A :class:`DataError` whose message is guaranteed to be one printable line."""
    return DataError(printable(message))


def check_line_length(path: Path, line_no: int, line: str) -> None:
    """Refuse a line longer than :data:`MAX_LINE_CHARS`."""
    if len(line) > MAX_LINE_CHARS:
        raise data_error(f"{path}:{line_no}: line is longer than {MAX_LINE_CHARS:,} characters")


def _read_at_most(handle: BinaryIO, limit: int) -> bytes | None:
    """All of ``handle``, or ``None`` if it holds more than ``limit`` bytes.

    A regular file's size is checked before reading; anything else (a pipe, a
    device) is read in chunks and given up on past the limit.
    """
    st = os.fstat(handle.fileno())
    if stat.S_ISREG(st.st_mode) and st.st_size > limit:
        return None
    chunks, total = [], 0
    while True:
        chunk = handle.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)


def read_utf8(path: Path) -> str:
    """The text of ``path``; a :class:`DataError` naming the file (and line) if
    unreadable, larger than :data:`MAX_FILE_BYTES`, or not UTF-8."""
    try:
        with open(path, "rb") as handle:
            raw = _read_at_most(handle, MAX_FILE_BYTES)
    except OSError as exc:
        raise data_error(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise data_error(f"{path}: cannot read: {exc}") from exc
    if raw is None:
        raise data_error(f"{path}: file is larger than {MAX_FILE_BYTES:,} bytes, the most read at once")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise data_error(f"{path}:{line_no}: not valid UTF-8 text") from exc


def train_count(n: int) -> int:
    """Number of records, out of ``n >= 2``, that go to training.

    ``int(0.8 * n)`` computed exactly as ``4 * n // 5`` (no float rounding),
    then lowered by one if that would leave no test record.
    """
    if n < 2:
        raise ValueError(f"need at least 2 records to split, got {n}")
    n_train = (4 * n) // 5
    if n_train >= n:
        n_train = n - 1
    return n_train


def split_records(records: Sequence[str]) -> tuple[str, str]:
    """Split ``records`` (at least 2) into ``(train_text, test_text)``.

    Each side is its records joined with ``"\\n"``.
    """
    n_train = train_count(len(records))
    return "\n".join(records[:n_train]), "\n".join(records[n_train:])
