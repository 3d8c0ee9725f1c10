"""User data: a directory of per-client files, or one JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privlm.data.userdata import MAX_LINE_CHARS, load_dir, load_jsonl
from privlm.errors import DataError


def _jsonl(rows: list[object]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _one_line(message: str) -> str:
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- load_dir


def test_load_dir_txt_and_jsonl_clients(tmp_path: Path) -> None:
    (tmp_path / "alice.txt").write_text("line 1\n\nline 2\r\nline 3\n   \nline 4\nline 5\n", encoding="utf-8")
    (tmp_path / "bob.jsonl").write_text(
        _jsonl([{"text": "first note\nwith two lines"}, {"text": "second", "extra": 1}]) + "\n",
        encoding="utf-8",
    )
    (tmp_path / "carol.txt").write_text("\ufeffonly one record\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("not a client", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("ignored", encoding="utf-8")

    corpus = load_dir(tmp_path)
    clients = {c.client_id: c for c in corpus.clients}
    assert [c.client_id for c in corpus.clients] == ["alice", "bob", "carol"]
    # 5 non-blank lines: 4 train, 1 test; "\r\n" endings removed.
    assert clients["alice"].train == "line 1\nline 2\nline 3\nline 4"
    assert clients["alice"].test == "line 5"
    # JSONL rows are records even when they contain newlines.
    assert clients["bob"].train == "first note\nwith two lines"
    assert clients["bob"].test == "second"
    # One record: all of it trains, the test text is empty (byte-order mark dropped).
    assert clients["carol"].train == "only one record"
    assert clients["carol"].test == ""
    assert corpus.info["records"] == 8
    assert corpus.info["clients_without_test"] == 1


def test_load_dir_split_is_80_20_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("".join(f"r{i}\n" for i in range(10)), encoding="utf-8")
    client = load_dir(tmp_path).clients[0]
    assert client.train.split("\n") == [f"r{i}" for i in range(8)]
    assert client.test.split("\n") == ["r8", "r9"]


def test_load_dir_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path / "missing")
    assert str(tmp_path / "missing") in _one_line(str(excinfo.value))
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert str(tmp_path) in _one_line(str(excinfo.value))
    assert "no <client_id>.txt" in str(excinfo.value)


def test_load_dir_client_without_records_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert str(tmp_path / "empty.txt") in _one_line(str(excinfo.value))


def test_load_dir_same_client_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("a\n", encoding="utf-8")
    (tmp_path / "x.jsonl").write_text(_jsonl([{"text": "b"}]), encoding="utf-8")
    with pytest.raises(DataError, match="client 'x'"):
        load_dir(tmp_path)


def test_load_dir_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"fine\nalso fine\ncaf\xe9 au lait\n")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    message = _one_line(str(excinfo.value))
    assert f"{tmp_path / 'latin.txt'}:3:" in message and "UTF-8" in message


def test_load_dir_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    file = tmp_path / "p.jsonl"
    file.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{file}:2: invalid JSON" in _one_line(str(excinfo.value))

    file.write_text(_jsonl([{"text": "ok"}, {"body": "no text"}]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{file}:2: missing field 'text'" in _one_line(str(excinfo.value))

    file.write_text(_jsonl([{"text": 42}]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{file}:1: field 'text' must be a string" in _one_line(str(excinfo.value))

    file.write_text(_jsonl([["text", "a list"]]), encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:1: expected a JSON object"):
        load_dir(tmp_path)


def test_overlong_line_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "long.txt"
    file.write_text("short\n" + "x" * (MAX_LINE_CHARS + 1) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{file}:2: line is longer than 1,000,000 characters" in _one_line(str(excinfo.value))
    # Exactly the limit is fine.
    file.write_text("short\n" + "x" * MAX_LINE_CHARS + "\n", encoding="utf-8")
    assert load_dir(tmp_path).clients[0].test == "x" * MAX_LINE_CHARS


# --------------------------------------------------------------------------- load_jsonl


def test_load_jsonl_groups_rows_by_client_in_file_order(tmp_path: Path) -> None:
    rows = [{"client_id": "u2", "text": f"u2-{i}"} for i in range(5)]
    rows.insert(2, {"client_id": "u1", "text": "u1-0"})
    rows.append({"client_id": "u1", "text": "u1-1"})
    rows.append({"client_id": "u3", "text": "   "})  # blank text: not a record
    rows.append({"client_id": "u3", "text": "u3-only"})
    file = tmp_path / "all.jsonl"
    file.write_text(_jsonl(rows) + "\n\n", encoding="utf-8")
    corpus = load_jsonl(file)
    clients = {c.client_id: c for c in corpus.clients}
    assert [c.client_id for c in corpus.clients] == ["u1", "u2", "u3"]
    assert (clients["u1"].train, clients["u1"].test) == ("u1-0", "u1-1")
    assert (clients["u2"].train, clients["u2"].test) == ("u2-0\nu2-1\nu2-2\nu2-3", "u2-4")
    assert (clients["u3"].train, clients["u3"].test) == ("u3-only", "")
    assert corpus.name == "all"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "no id"}, "all.jsonl:2: missing field 'client_id'"),
        ({"client_id": 7, "text": "x"}, "all.jsonl:2: field 'client_id' must be a string, got a number"),
        ({"client_id": "a"}, "all.jsonl:2: missing field 'text'"),
        ({"client_id": "a", "text": None}, "all.jsonl:2: field 'text' must be a string, got null"),
        ({"client_id": "", "text": "x"}, "all.jsonl:2: field 'client_id' is empty"),
    ],
)
def test_load_jsonl_field_errors(tmp_path: Path, row: dict, expected: str) -> None:
    file = tmp_path / "all.jsonl"
    file.write_text(_jsonl([{"client_id": "a", "text": "fine"}, row]), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_jsonl(file)
    message = _one_line(str(excinfo.value))
    assert str(file) in message and expected in message


def test_load_jsonl_other_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="not a file"):
        load_jsonl(tmp_path)
    file = tmp_path / "e.jsonl"
    file.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_jsonl(file)
    file.write_text(_jsonl([{"client_id": "a", "text": " "}]), encoding="utf-8")
    with pytest.raises(DataError, match="client 'a' has no text"):
        load_jsonl(file)
    file.write_bytes(b'{"client_id": "a", "text": "ok"}\n{"client_id": "a", "text": "\xff"}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: not valid UTF-8"):
        load_jsonl(file)
    file.write_text('{"client_id": "a", "text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.jsonl:2: invalid JSON"):
        load_jsonl(file)
