"""Pieces shared by the data sources: reading a text file, and the train/test split.

The split:

LEAF and McMahan et al. (2017) hold out the *last* part of each client's text:
the first 80% of a client's records (lines, speeches, notes) train, the rest
test, and every client keeps at least one test record. Keeping the order (not
shuffling) means the test text is "what this data owner wrote later".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privlm.errors import DataError


def read_utf8(path: Path) -> str:
    """The text of ``path``; a :class:`DataError` naming the file (and line) if unreadable or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line_no}: not valid UTF-8 text") from exc


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
