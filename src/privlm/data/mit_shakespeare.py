"""Shakespeare's plays as a federated corpus: one client per (play, speaking role).

The input is the MIT "Complete Works" HTML (``<play>/full.html`` for 37 plays,
see ``privlm data download shakespeare``). Each file is ASCII with one HTML
element per physical line:

* ``<h3>ACT I</h3>``, ``<h3>SCENE II. place</h3>``, ``<h3>PROLOGUE</h3>`` -
  headers; each one ends the current speech.
* ``<A NAME=speech12><b>First Witch</b></a>`` - a speech begins; the speaker is
  upper-cased (as LEAF does) so ``First Witch`` and ``FIRST WITCH`` are one role.
* ``<A NAME=1.3.41>text</A><br>`` - one verse/prose line of the current speaker.
  Lines before any speaker tag in a scene (unlabelled prologues, letters,
  songs) have no role and are skipped. Stage directions (``<i>...</i>``) are not
  lines.

As in LEAF / McMahan et al. (2017), roles with fewer than 2 lines are dropped
and each role's last 20% of lines (at least one) is its test text.
"""

from __future__ import annotations

import re
from pathlib import Path

from privlm.data._common import check_line_length, data_error, read_utf8, split_records
from privlm.data.corpus import ClientData, FederatedCorpus

#: The 37 play directories of the MIT Shakespeare snapshot, in sorted order.
PLAYS: tuple[str, ...] = (
    "1henryiv", "1henryvi", "2henryiv", "2henryvi", "3henryvi", "allswell",
    "asyoulikeit", "cleopatra", "comedy_errors", "coriolanus", "cymbeline",
    "hamlet", "henryv", "henryviii", "john", "julius_caesar", "lear", "lll",
    "macbeth", "measure", "merchant", "merry_wives", "midsummer", "much_ado",
    "othello", "pericles", "richardii", "richardiii", "romeo_juliet",
    "taming_shrew", "tempest", "timon", "titus", "troilus_cressida",
    "twelfth_night", "two_gentlemen", "winters_tale",
)  # fmt: skip

_SPEAKER_RE = re.compile(r"^<A NAME=speech\d+><b>(.*?)</b></a>\s*$", re.IGNORECASE)
_LINE_RE = re.compile(r"^<A NAME=\d+\.\d+\.\d+>(.*)</A><br>\s*$", re.IGNORECASE)
_MIN_LINES = 2

_DOWNLOAD_HINT = "run `privlm data download shakespeare` or set data.path"


def parse_play(html_path: Path) -> dict[str, list[str]]:
    """Return ``{SPEAKER: [line, ...]}`` for one ``full.html``, lines in play order.

    Raises :class:`~privlm.errors.DataError` (naming the file and line) if the
    file is not UTF-8/ASCII text or has a line longer than ``MAX_LINE_CHARS``.
    """
    text = read_utf8(html_path)

    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    for line_no, line in enumerate(text.splitlines(), start=1):
        check_line_length(html_path, line_no, line)
        if line.startswith("<A NAME="):
            m = _LINE_RE.match(line)
            if m is not None:
                if speaker is not None:
                    roles.setdefault(speaker, []).append(m.group(1))
                continue
            m = _SPEAKER_RE.match(line)
            if m is not None:
                name = " ".join(m.group(1).split()).upper()
                speaker = name or None
        elif line[:4].lower() == "<h3>":
            # Act, scene and prologue headers: a new scene has no speaker yet.
            speaker = None
    return roles


def _play_files(path: Path) -> list[tuple[str, Path]]:
    """The ``(play, full.html)`` pairs under ``path``, sorted by play name."""
    if not path.exists():
        raise data_error(f"Shakespeare data not found at {path}; {_DOWNLOAD_HINT}")
    if not path.is_dir():
        raise data_error(
            f"Shakespeare data path {path} is not a directory of <play>/full.html files; "
            f"{_DOWNLOAD_HINT}"
        )
    try:
        plays = sorted(
            (child.name, child / "full.html")
            for child in path.iterdir()
            if child.is_dir() and (child / "full.html").is_file()
        )
    except OSError as exc:
        raise data_error(f"{path}: cannot list the directory: {exc.strerror or exc}") from exc
    if not plays:
        raise data_error(f"no Shakespeare plays (<play>/full.html) found in {path}; {_DOWNLOAD_HINT}")
    return plays


def load_shakespeare(path: Path) -> FederatedCorpus:
    """Load the MIT Shakespeare plays under ``path`` as one client per (play, role).

    ``path`` is the directory holding ``<play>/full.html`` (every play found is
    used; the standard snapshot has 37). Client ids are ``"<play>/<SPEAKER>"``,
    clients are sorted by id, and each client's train/test texts are its lines
    joined with ``"\\n"``.
    """
    path = Path(path)
    clients: list[ClientData] = []
    total_roles = 0
    total_lines = 0
    plays = _play_files(path)
    for play, html_path in plays:
        roles = parse_play(html_path)
        total_roles += len(roles)
        for speaker, lines in roles.items():
            total_lines += len(lines)
            if len(lines) < _MIN_LINES:
                continue
            train, test = split_records(lines)
            clients.append(ClientData(client_id=f"{play}/{speaker}", train=train, test=test))
    if not clients:
        raise data_error(
            f"{path}: no speaking role has at least {_MIN_LINES} lines in "
            f"{', '.join(str(f) for _, f in plays[:3])}{' ...' if len(plays) > 3 else ''}; "
            "is this the MIT Shakespeare HTML?"
        )
    clients.sort(key=lambda c: c.client_id)
    info = {
        "source": "shakespeare",
        "plays": len(plays),
        "roles": total_roles,
        "lines": total_lines,
        "dropped_clients": total_roles - len(clients),
    }
    return FederatedCorpus(name="shakespeare", clients=tuple(clients), info=info)
