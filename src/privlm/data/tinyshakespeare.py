"""char-rnn's "tiny shakespeare" as a federated corpus: one client per speaker.

The file (``input.txt`` of karpathy/char-rnn, 1,115,394 characters) is a run
of speech blocks separated by blank lines; each block starts with a line
``SPEAKER NAME:`` followed by the speech. Speaker names are upper-cased so
``Nurse:`` and ``NURSE:`` are one client (the file has no play boundaries, so a
name such as GLOUCESTER may merge roles from several plays).

Each block's speech (the lines after the name line, joined with ``"\\n"``) is
one record. Blocks with no speech text are skipped. Speakers with fewer than 2
records are dropped; the rest keep their first 80% of speeches for training
and the last 20% (at least one) for testing.
"""

from __future__ import annotations

from pathlib import Path

from privlm.data._common import check_line_length, data_error, read_utf8, split_records
from privlm.data.corpus import ClientData, FederatedCorpus

#: File names looked for when ``path`` is a directory, in order.
FILE_NAMES: tuple[str, ...] = ("tinyshakespeare.txt", "input.txt")
_MIN_BLOCKS = 2
_DOWNLOAD_HINT = "run `privlm data download tinyshakespeare` or set data.path"


def _resolve_file(path: Path) -> Path:
    """The text file to read: ``path`` itself, or a known file name inside it."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in FILE_NAMES:
            candidate = path / name
            if candidate.is_file():
                return candidate
        raise data_error(
            f"no {' or '.join(FILE_NAMES)} found in {path}; {_DOWNLOAD_HINT}"
        )
    raise data_error(f"tinyshakespeare data not found at {path}; {_DOWNLOAD_HINT}")


def parse_speeches(file: Path) -> dict[str, list[str]]:
    """Return ``{SPEAKER: [speech, ...]}`` in file order for a tiny-shakespeare file.

    Raises :class:`~privlm.errors.DataError` naming the file and line for
    non-UTF-8 text, a line longer than ``MAX_LINE_CHARS``, or a block whose
    first line is not ``NAME:``.
    """
    text = read_utf8(file)

    speeches: dict[str, list[str]] = {}
    speaker: str | None = None  # speaker of the block being read, None between blocks
    body: list[str] = []

    def close_block() -> None:
        if speaker is not None and body:
            speeches.setdefault(speaker, []).append("\n".join(body))

    for line_no, line in enumerate(text.splitlines(), start=1):
        check_line_length(file, line_no, line)
        if not line.strip():
            close_block()
            speaker, body = None, []
        elif speaker is None:
            name = line.strip()
            if not name.endswith(":") or len(name) < 2:
                shown = name if len(name) <= 60 else name[:57] + "..."
                raise data_error(
                    f"{file}:{line_no}: expected a speaker line 'NAME:' to start a block, "
                    f"got {shown!r}"
                )
            speaker = " ".join(name[:-1].split()).upper()
        else:
            body.append(line)
    close_block()
    return speeches


def load_tinyshakespeare(path: Path) -> FederatedCorpus:
    """Load tiny shakespeare from a file, or a directory holding ``tinyshakespeare.txt`` / ``input.txt``.

    Clients are speakers (upper-cased), sorted by id; see the module docstring
    for the record and split rules.
    """
    file = _resolve_file(Path(path))
    speeches = parse_speeches(file)
    if not speeches:
        raise data_error(f"{file}: no speech blocks found; {_DOWNLOAD_HINT}")
    clients: list[ClientData] = []
    for speaker, blocks in sorted(speeches.items()):
        if len(blocks) < _MIN_BLOCKS:
            continue
        train, test = split_records(blocks)
        clients.append(ClientData(client_id=speaker, train=train, test=test))
    if not clients:
        raise data_error(
            f"{file}: no speaker has at least {_MIN_BLOCKS} speeches, so there is no client to train on"
        )
    info = {
        "source": "tinyshakespeare",
        "speakers": len(speeches),
        "speeches": sum(len(b) for b in speeches.values()),
        "dropped_clients": len(speeches) - len(clients),
    }
    return FederatedCorpus(name="tinyshakespeare", clients=tuple(clients), info=info)
