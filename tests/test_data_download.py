"""Downloads from a local HTTP mirror: checksums, atomic writes, skipping, errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from privlm.data.download import (
    SHAKESPEARE_SHA256,
    TINYSHAKESPEARE_SHA256,
    default_data_path,
    download,
    files_for,
)
from privlm.data.mit_shakespeare import PLAYS, load_shakespeare
from privlm.data.tinyshakespeare import load_tinyshakespeare
from privlm.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "shakespeare").is_dir() or not (SHARED / "tinyshakespeare.txt").is_file(),
    reason=f"shared test data not found at {SHARED} (expected shared/ beside the repository)",
)


class _Server:
    """A static file server on 127.0.0.1 that records the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        requests: list[str] = []
        self.requests = requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def shared_server() -> Iterator[_Server]:
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}")
    with _Server(SHARED) as server:
        yield server


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@needs_shared
def test_download_both_data_sets_from_a_mirror(tmp_path: Path, shared_server: _Server) -> None:
    tiny_dir = download("tinyshakespeare", tmp_path / "tiny", base_url=shared_server.url, progress=True)
    plays_dir = download("shakespeare", tmp_path / "plays", base_url=shared_server.url + "/", progress=False)
    assert tiny_dir == tmp_path / "tiny" and plays_dir == tmp_path / "plays"

    assert _sha256(tiny_dir / "tinyshakespeare.txt") == TINYSHAKESPEARE_SHA256
    for play in PLAYS:
        assert _sha256(plays_dir / play / "full.html") == SHAKESPEARE_SHA256[play]
    assert not [p for p in _leftovers(tmp_path) if p.name.endswith(".part")]
    assert len(shared_server.requests) == 1 + 37

    assert load_tinyshakespeare(tiny_dir).num_clients == 245
    assert load_shakespeare(plays_dir).num_clients == 1227

    # A second download finds every file with the right sum and fetches nothing.
    shared_server.requests.clear()
    download("shakespeare", plays_dir, base_url=shared_server.url, progress=False)
    download("tinyshakespeare", tiny_dir, base_url=shared_server.url, progress=False)
    assert shared_server.requests == []


@needs_shared
def test_a_wrong_local_file_is_replaced(tmp_path: Path, shared_server: _Server) -> None:
    (tmp_path / "tinyshakespeare.txt").write_text("stale", encoding="utf-8")
    download("tinyshakespeare", tmp_path, base_url=shared_server.url, progress=False)
    assert _sha256(tmp_path / "tinyshakespeare.txt") == TINYSHAKESPEARE_SHA256
    assert shared_server.requests == ["/tinyshakespeare.txt"]


@needs_shared
def test_mirror_from_environment(tmp_path: Path, shared_server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVLM_DATA_MIRROR", shared_server.url)
    monkeypatch.setenv("PRIVLM_DATA_DIR", str(tmp_path / "cache"))
    path = download("tinyshakespeare", None, progress=False)
    assert path == tmp_path / "cache" / "tinyshakespeare"
    assert _sha256(path / "tinyshakespeare.txt") == TINYSHAKESPEARE_SHA256


def test_corrupted_file_raises_and_leaves_nothing(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "shakespeare" / "1henryiv").mkdir(parents=True)
    (mirror / "tinyshakespeare.txt").write_text("First Citizen:\nAltered text.\n", encoding="utf-8")
    (mirror / "shakespeare" / "1henryiv" / "full.html").write_text("<html>altered</html>\n", encoding="utf-8")
    bad_sum = _sha256(mirror / "tinyshakespeare.txt")
    dest = tmp_path / "dest"
    with _Server(mirror) as server:
        with pytest.raises(DataError) as excinfo:
            download("tinyshakespeare", dest, base_url=server.url, progress=False)
        message = str(excinfo.value)
        assert "\n" not in message
        assert str(dest / "tinyshakespeare.txt") in message
        assert TINYSHAKESPEARE_SHA256 in message and bad_sum in message
        assert _leftovers(dest) == []

        with pytest.raises(DataError, match="checksum mismatch") as excinfo:
            download("shakespeare", dest, base_url=server.url, progress=False)
        assert str(dest / "1henryiv" / "full.html") in str(excinfo.value)
        assert _leftovers(dest) == []


def test_missing_file_on_the_mirror_names_the_url(tmp_path: Path) -> None:
    (tmp_path / "mirror").mkdir()
    with _Server(tmp_path / "mirror") as server:
        with pytest.raises(DataError) as excinfo:
            download("tinyshakespeare", tmp_path / "dest", base_url=server.url, progress=False)
    assert f"{server.url}/tinyshakespeare.txt" in str(excinfo.value)
    assert "404" in str(excinfo.value)
    assert _leftovers(tmp_path / "dest") == []


def test_unreachable_host_is_a_data_error(tmp_path: Path) -> None:
    with _Server(tmp_path) as server:
        url = server.url  # the port is closed once the server is gone
    with pytest.raises(DataError, match="PRIVLM_DATA_MIRROR"):
        download("tinyshakespeare", tmp_path / "dest", base_url=url, progress=False)


def test_default_data_path_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRIVLM_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_path("shakespeare") == tmp_path / "explicit" / "shakespeare"
    monkeypatch.delenv("PRIVLM_DATA_DIR")
    assert default_data_path("tinyshakespeare") == tmp_path / "xdg" / "privlm" / "data" / "tinyshakespeare"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_path("shakespeare") == tmp_path / "home" / ".cache" / "privlm" / "data" / "shakespeare"
    with pytest.raises(DataError, match="unknown data set"):
        default_data_path("gutenberg")


def test_public_urls_are_pinned() -> None:
    [(url, rel, sha)] = files_for("tinyshakespeare", None)
    assert url == (
        "https://raw.githubusercontent.com/karpathy/char-rnn/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt"
    )
    assert (rel, sha) == ("tinyshakespeare.txt", TINYSHAKESPEARE_SHA256)
    plays = files_for("shakespeare", None)
    assert len(plays) == 37
    assert plays[0][0] == (
        "https://raw.githubusercontent.com/TheMITTech/shakespeare/"
        "6b82db852c7322dd33e95db347f0ddfc812c6409/1henryiv/full.html"
    )
    assert files_for("shakespeare", "http://m/x/")[0][0] == "http://m/x/shakespeare/1henryiv/full.html"


@needs_shared
def test_embedded_sums_match_the_shared_sha256sums() -> None:
    listed = {}
    for line in (SHARED / "shakespeare" / "SHA256SUMS").read_text(encoding="ascii").splitlines():
        digest, name = line.split()
        listed[name.removeprefix("./").removesuffix("/full.html")] = digest
    assert listed == SHAKESPEARE_SHA256
    assert _sha256(SHARED / "tinyshakespeare.txt") == TINYSHAKESPEARE_SHA256
