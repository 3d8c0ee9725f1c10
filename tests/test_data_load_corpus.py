"""``load_corpus``: dispatch on ``data.source`` and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import privlm.data as data
from privlm.data import SOURCES, generate_clinic, load_corpus
from privlm.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_synthetic_clinic_ignores_path() -> None:
    corpus = load_corpus("synthetic-clinic", Path("/does/not/matter"), num_clients=7, seed=11)
    assert corpus == generate_clinic(7, 11)
    assert corpus.num_clients == 7


def test_dir_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "ann.txt").write_text("a\nb\n", encoding="utf-8")
    corpus = load_corpus("dir", tmp_path / "users", num_clients=99, seed=0)
    assert [(c.client_id, c.train, c.test) for c in corpus.clients] == [("ann", "a", "b")]

    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps({"client_id": "z", "text": "t"}) + "\n", encoding="utf-8")
    corpus = load_corpus("jsonl", file, num_clients=1, seed=0)
    assert [(c.client_id, c.train, c.test) for c in corpus.clients] == [("z", "t", "")]


@pytest.mark.parametrize("source", ["dir", "jsonl"])
def test_user_sources_need_a_path(source: str) -> None:
    with pytest.raises(DataError, match="needs data.path"):
        load_corpus(source, None, num_clients=1, seed=0)


@pytest.mark.parametrize("source", ["shakespeare", "tinyshakespeare"])
def test_missing_default_download_says_what_to_do(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRIVLM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as excinfo:
        load_corpus(source, None, num_clients=1, seed=0)
    message = str(excinfo.value)
    assert str(tmp_path / source) in message
    assert f"privlm data download {source}" in message and "data.path" in message


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared test data not found at {SHARED}")
def test_shakespeare_sources_read_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default path is $PRIVLM_DATA_DIR/<name>; link the shared copies there.
    (tmp_path / "shakespeare").symlink_to(SHARED / "shakespeare", target_is_directory=True)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "tinyshakespeare.txt").symlink_to(SHARED / "tinyshakespeare.txt")
    monkeypatch.setenv("PRIVLM_DATA_DIR", str(tmp_path))
    assert load_corpus("tinyshakespeare", None, num_clients=1, seed=0).num_clients == 245
    assert load_corpus("shakespeare", None, num_clients=1, seed=0).name == "shakespeare"
    # An explicit path wins over the default.
    assert load_corpus("tinyshakespeare", SHARED / "tinyshakespeare.txt", 1, 0).num_clients == 245


def test_unknown_source_names_the_key() -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus("wikipedia", None, num_clients=1, seed=0)
    assert "data.source" in str(excinfo.value) and "'wikipedia'" in str(excinfo.value)
    assert "synthetic-clinic" in str(excinfo.value)


def test_public_names_are_exported() -> None:
    assert set(SOURCES) == {"synthetic-clinic", "shakespeare", "tinyshakespeare", "dir", "jsonl"}
    for name in data.__all__:
        assert hasattr(data, name), name
