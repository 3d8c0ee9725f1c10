"""Download the public Shakespeare data sets, checked against known SHA-256 sums.

Both data sets are fetched from pinned commits, so their bytes never change:

* ``tinyshakespeare``: karpathy/char-rnn ``data/tinyshakespeare/input.txt``,
  saved as ``tinyshakespeare.txt`` (1,115,394 bytes).
* ``shakespeare``: the 37 plays of TheMITTech/shakespeare (the MIT "Complete
  Works"), saved as ``<play>/full.html`` (9,208,002 bytes in all).

Files go to :func:`default_data_path` unless a destination is given. A mirror
laid out as ``{base}/tinyshakespeare.txt`` and ``{base}/shakespeare/<play>/full.html``
can replace the public hosts (``base_url=`` or ``$PRIVLM_DATA_MIRROR``; any URL
urllib reads, including ``file://``). Every file is written to a temporary file
next to its destination, checked, then moved into place atomically, so an
interrupted or corrupted download never leaves a partial file. Files already
present with the right checksum are not downloaded again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Protocol

from privlm.data.mit_shakespeare import PLAYS
from privlm.errors import DataError

DatasetName = Literal["shakespeare", "tinyshakespeare"]
DATASETS: tuple[str, ...] = ("shakespeare", "tinyshakespeare")

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/"
    "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_URL_PREFIX = (
    "https://raw.githubusercontent.com/TheMITTech/shakespeare/6b82db852c7322dd33e95db347f0ddfc812c6409"
)
TINYSHAKESPEARE_FILE = "tinyshakespeare.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

#: sha256 of every ``<play>/full.html`` at the pinned commit.
SHAKESPEARE_SHA256: dict[str, str] = {
    "1henryiv": "69e80265106424a7656f404f3c236e1bf513d9e39c71b871c0dfcd043473e405",
    "1henryvi": "7cd9c35e008d40015550ac77ebce372f1fea940a3d6cb0ed29bf74194af1cebd",
    "2henryiv": "bbdaf77467c5c97e6135332d13ef7375fb470cce88cf06741e1221ace3d016e1",
    "2henryvi": "4614f8eee4b97ea46150122926f43404648197f9cb1408a684b7ab4e604d0279",
    "3henryvi": "8b24bb4b26f5e5d0cb7d0d9489fa8635149431625e86f7d5dc3a92067c75e26a",
    "allswell": "94ea943a80448b6a818961290dcf42ffb15d5ffc8d98be8f52351d89f67b4eed",
    "asyoulikeit": "848c6b7fccdb87aeb8d0fb1e461fcc2c6ff5958195f6d4364cdeb9df5acb8ec7",
    "cleopatra": "cb4e5a1e4edb60c73eb7921fa2c4433be4f3e95416cdcfe317f8856638b42742",
    "comedy_errors": "b5283e52606d57f7c09c86049a9965be08cd22fe2ff22d775e39a69addb04a81",
    "coriolanus": "5110948dc73dd582138d7ebf1b8dc0ecb964943d135b3d83f3782344768efb6d",
    "cymbeline": "6aa008979f3875d51caa7e1e3fb541b2565b97c3e4bab6019e34a7020f2dcb94",
    "hamlet": "f677d3c9a7ccb82b5f9ec20f9327fdc6e357e2311366a16ad64d656517d82866",
    "henryv": "4bd0c2a2a3fecdadc82ba335d9070d8f583369a9596174958f1b73a2302a9650",
    "henryviii": "65d22870ab8e8eb7596f0b00a34ddfbdd92257820d871e264c137af032a00573",
    "john": "a95f79d4881e06ee9cc52133dafc7bbf582107cff8d522f03f6c50f08ef47a22",
    "julius_caesar": "1b820bfeedb45303ab059f4c6c1bce3b9d7ce130a2422116aa0bc4581ee031fa",
    "lear": "fe7f83c3a54308b73b3221e928b850352a647c2f1bb555646bf644b873f293bc",
    "lll": "0b159db8f20f4c6c8de92dd2db96457f6affe1e7dd137389dbbdc4970f2deb36",
    "macbeth": "d1489188f81c4f0ff4b8ed8df5154df76a79ccb0ec8328a577a3fbf89bd113b7",
    "measure": "77e3b622779e3829502c8dcdb6b697ae7021675161bb26ccb263339b7d1adb44",
    "merchant": "39cb40b75efbef5b23df3cb984dda2db2914c2d4f77ba72d1978ae463a2e0d00",
    "merry_wives": "658f66c0387579df3ca2d25ed85fcf8851ccaac16deee1a00d9c4dbf9f1e2389",
    "midsummer": "b6a1f8fd3099cfc1f8d4199907ebcc9ad7a673d8a154a08904eda95f18fb547e",
    "much_ado": "edd3c781d777b1a6abca76e15b6c3f4b8a79fd7d9e63b920d16588d53051d1be",
    "othello": "ea95d7b751d67809b2cd8792ad3ca55a36aa8c8d7979165e53c9f34d8036a08d",
    "pericles": "89622d8a3e1d283e5d5061882617f7f71c515dc2552eeb15044cbf7ed5fb0b32",
    "richardii": "b3fa97338c61e9c9e67fcbdcda21c11bea21470aeda672cf6ced8a4b2422d373",
    "richardiii": "4656be3b262028ece67f2ae60efcfcd11aea4401cb58706b994deee09b307b39",
    "romeo_juliet": "0cf9083fdc2ba5f1b1a88700c8429742a3734379038fa4d7698323224d1bc9dd",
    "taming_shrew": "88b2885c14bf5068135b166fc7ace8d1b7e0bbb3a70d2abe0f77abd315a616c8",
    "tempest": "c3ed4bec5e1f07801ac9ef0ee0ae93e892ded38796bda443d51a5c78b76c3440",
    "timon": "3616850447512323a3ae813c1437da9a19457b1f34a549b03ff39c1402c50c11",
    "titus": "80ee75a49de4b4560343fea4e514749a6506f7811ef9e27ab68896ff5bf67d57",
    "troilus_cressida": "78983aa2bbc300416c2dc14edf5eb00e595693cb01bbe1d8de1db91ec719dd05",
    "twelfth_night": "0b738f028caa2541d96838a859c14152d690272970649cb82f428ce1dfcc7106",
    "two_gentlemen": "3cedd433df03b617c9b5d66481b3e778970a3e1306da4a147ba997311c6bfeb0",
    "winters_tale": "09ec2501fc25dc9fad5061513be93ffaaf051fe14f04e59e430da77af745b34b",
}

_TIMEOUT_S = 60
_CHUNK = 1 << 16


def data_root() -> Path:
    """Where data sets are cached: ``$PRIVLM_DATA_DIR``, else ``$XDG_CACHE_HOME/privlm/data``, else ``~/.cache/privlm/data``."""
    explicit = os.environ.get("PRIVLM_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "privlm" / "data"


def default_data_path(name: str) -> Path:
    """The default ``data.path`` of a downloadable data set: ``data_root() / name``."""
    _check_name(name)
    return data_root() / name


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_for(name: str, base_url: str | None) -> list[tuple[str, str, str]]:
    """``(url, relative destination, sha256)`` for every file of data set ``name``."""
    _check_name(name)
    base = base_url.rstrip("/") if base_url else None
    if name == "tinyshakespeare":
        url = f"{base}/{TINYSHAKESPEARE_FILE}" if base else TINYSHAKESPEARE_URL
        return [(url, TINYSHAKESPEARE_FILE, TINYSHAKESPEARE_SHA256)]
    prefix = f"{base}/shakespeare" if base else SHAKESPEARE_URL_PREFIX
    return [(f"{prefix}/{play}/full.html", f"{play}/full.html", SHAKESPEARE_SHA256[play]) for play in PLAYS]


class _Progress(Protocol):
    def file_started(self, rel: str) -> None: ...
    def file_done(self) -> None: ...


class _NoProgress:
    def file_started(self, rel: str) -> None:
        pass

    def file_done(self) -> None:
        pass


@contextmanager
def _progress(name: str, total: int, enabled: bool) -> Iterator[_Progress]:
    """A rich progress bar over files when enabled and rich is installed."""
    if enabled:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            enabled = False
    if not enabled:
        yield _NoProgress()
        return

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
    )

    class _RichProgress:
        def __init__(self) -> None:
            self.task = bar.add_task(f"{name}", total=total)

        def file_started(self, rel: str) -> None:
            bar.update(self.task, description=f"{name}: {rel}")

        def file_done(self) -> None:
            bar.advance(self.task)

    with bar:
        tracker = _RichProgress()
        yield tracker
        bar.update(tracker.task, description=f"{name}: done")


def _fetch(url: str, target: Path, expected: str) -> None:
    """Download ``url`` to ``target`` through a checked temporary file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DataError(
                    f"download of {url} failed: {reason}; check the network or set PRIVLM_DATA_MIRROR to a mirror"
                ) from exc
        actual = digest.hexdigest()
        if actual != expected:
            raise DataError(
                f"checksum mismatch for {target} (from {url}): expected sha256 {expected}, got {actual}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    name: DatasetName,
    to: Path | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download data set ``name`` into ``to`` (default :func:`default_data_path`) and return that folder.

    ``base_url`` (else ``$PRIVLM_DATA_MIRROR``) points at a mirror laid out as
    ``{base}/tinyshakespeare.txt`` and ``{base}/shakespeare/<play>/full.html``;
    without it the pinned public GitHub URLs are used. The returned folder is
    what :func:`~privlm.data.load_corpus` reads for that source.

    Raises :class:`DataError` on network errors or checksum mismatches (the
    bad file is not kept).
    """
    _check_name(name)
    dest = Path(to).expanduser() if to is not None else default_data_path(name)
    mirror = base_url or os.environ.get("PRIVLM_DATA_MIRROR") or None
    files = files_for(name, mirror)
    todo = [(url, dest / rel, sha) for url, rel, sha in files if not _is_valid(dest / rel, sha)]
    if not todo:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with _progress(name, len(todo), progress) as tracker:
        for url, target, sha in todo:
            tracker.file_started(str(target.relative_to(dest)))
            _fetch(url, target, sha)
            tracker.file_done()
    return dest


def _is_valid(path: Path, sha: str) -> bool:
    """Whether ``path`` exists with checksum ``sha``."""
    return path.is_file() and _sha256(path) == sha
