"""Bad data files: each is one DataError line naming the file (and line), never a crash or a hang.

Complements test_data_userdata.py / test_data_shakespeare.py (which cover the
common cases: missing files, empty clients, non-UTF-8, schema errors, a line
just over the limit) with the hostile ones: a 50 MB line, JSON nested too
deeply or with a 5000-digit number, lone surrogates, undecodable or multi-line
file names, read errors, oversized whole-file reads, corpora with no client.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from privlm.data import _common, load_corpus
from privlm.data._common import MAX_FILE_BYTES, MAX_LINE_CHARS
from privlm.data.mit_shakespeare import load_shakespeare
from privlm.data.tinyshakespeare import load_tinyshakespeare
from privlm.data.userdata import load_dir, load_jsonl
from privlm.errors import DataError

HUGE = 50 * 1024 * 1024  # a 50 MB line


def _message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message and message.isprintable(), repr(message)
    return message


def _write_huge_line(file: Path, prefix: bytes = b"", suffix: bytes = b"\n", before: bytes = b"") -> None:
    with open(file, "wb") as f:
        f.write(before + prefix)
        chunk = b"x" * (1 << 20)
        f.writelines(chunk for _ in range(HUGE // len(chunk)))
        f.write(suffix)


# --------------------------------------------------------------------------- huge lines


@pytest.mark.parametrize("suffix", [b"\n", b""])  # with and without a final newline
def test_dir_txt_with_a_50mb_line_is_refused_quickly(tmp_path: Path, suffix: bytes) -> None:
    file = tmp_path / "big.txt"
    _write_huge_line(file, suffix=suffix, before=b"fine\nalso fine\n")
    import tracemalloc

    tracemalloc.start()  # "quickly" as memory, not seconds: the 50 MB line is never held whole
    try:
        with pytest.raises(DataError) as excinfo:
            load_dir(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert f"{file}:3: line is longer than {MAX_LINE_CHARS:,} characters" in _message(excinfo)


def test_jsonl_record_with_enormous_text_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "rows.jsonl"
    _write_huge_line(file, prefix=b'{"client_id": "a", "text": "', suffix=b'"}\n',
                     before=b'{"client_id": "a", "text": "ok"}\n')
    with pytest.raises(DataError) as excinfo:
        load_jsonl(file)
    assert f"{file}:2: line is longer than" in _message(excinfo)
    # The same file as one client of a directory.
    (tmp_path / "dir").mkdir()
    file.rename(tmp_path / "dir" / "a.jsonl")
    with pytest.raises(DataError, match=r"a\.jsonl:2: line is longer than"):
        load_dir(tmp_path / "dir")


def test_record_of_multibyte_characters_up_to_the_limit_is_accepted(tmp_path: Path) -> None:
    # The limit is in characters: a 4-byte character line of exactly MAX_LINE_CHARS passes.
    file = tmp_path / "wide.txt"
    file.write_text("a\n" + "\U0001f600" * MAX_LINE_CHARS + "\n", encoding="utf-8")
    assert len(load_dir(tmp_path).clients[0].test) == MAX_LINE_CHARS


def test_tinyshakespeare_line_over_the_limit_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "tiny.txt"
    file.write_text("ALICE:\nHello.\n\nBOB:\n" + "y" * (MAX_LINE_CHARS + 1) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_tinyshakespeare(file)
    assert f"{file}:5: line is longer than {MAX_LINE_CHARS:,} characters" in _message(excinfo)


def test_mit_play_line_over_the_limit_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    html = tmp_path / "p" / "full.html"
    html.write_text("<html>\n<A NAME=1.1.1>" + "z" * (MAX_LINE_CHARS + 1) + "</A><br>\n", encoding="ascii")
    with pytest.raises(DataError) as excinfo:
        load_shakespeare(tmp_path)
    assert f"{html}:2: line is longer than" in _message(excinfo)


def test_whole_file_reads_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_FILE_BYTES == 1 << 30
    file = tmp_path / "tiny.txt"
    file.write_text("ALICE:\nHello.\n\nALICE:\nAgain.\n", encoding="utf-8")
    monkeypatch.setattr(_common, "MAX_FILE_BYTES", 10)
    with pytest.raises(DataError) as excinfo:
        load_tinyshakespeare(file)
    assert f"{file}: file is larger than 10 bytes" in _message(excinfo)


# --------------------------------------------------------------------------- schema-breaking JSON lines


@pytest.mark.parametrize(("line", "expected"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"client_id": "a", "text": "x", "n": 1' + "0" * 5000 + "}", "too many digits"),
    ('{"client_id": "a", "text": "\\ud800 lone"}', "field 'text' is not valid Unicode"),
    ('{"client_id": "\\udfff", "text": "x"}', "field 'client_id' is not valid Unicode"),
    ('{"client_id": "a", "text": ["a", "list"]}', "field 'text' must be a string, got an array"),
    ('{"client_id": {"nested": 1}, "text": "x"}', "field 'client_id' must be a string, got an object"),
    ("NaN", "expected a JSON object per line, got a number"),
    ('"just a string"', "expected a JSON object per line, got a string"),
    ("\x00", "invalid JSON"),
])
def test_jsonl_schema_breaking_rows(tmp_path: Path, line: str, expected: str) -> None:
    file = tmp_path / "rows.jsonl"
    file.write_text('{"client_id": "a", "text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_jsonl(file)
    message = _message(excinfo)
    assert f"{file}:2: " in message and expected in message
    assert len(message) < 400


def test_client_id_with_a_line_break_is_shown_escaped(tmp_path: Path) -> None:
    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps({"client_id": "two\nlines", "text": " "}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_jsonl(file)
    assert "two\\nlines" in _message(excinfo)


# --------------------------------------------------------------------------- file names, read errors


def test_undecodable_file_name_is_refused_with_a_printable_message(tmp_path: Path) -> None:
    raw_dir = os.fsencode(tmp_path)
    try:
        fd = os.open(raw_dir + b"/caf\xe9.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    os.write(fd, b"a\nb\n")
    os.close(fd)
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    message = _message(excinfo)
    assert "caf\\udce9.txt" in message and "not valid UTF-8" in message


def test_file_name_with_a_line_break_keeps_the_message_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "evil\nname.txt").write_text("\n\n", encoding="utf-8")  # no records
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert "evil\\nname.txt" in _message(excinfo)


def test_unreadable_client_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.txt").write_text("a\n", encoding="utf-8")
    (tmp_path / "locked.txt").write_text("a\n", encoding="utf-8")
    real_open = Path.open

    def fake_open(self: Path, *args, **kwargs):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", fake_open)
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{tmp_path / 'locked.txt'}: cannot read: Permission denied" in _message(excinfo)


def test_read_error_mid_file_names_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "disk.txt"
    file.write_text("a\nb\nc\n", encoding="utf-8")
    real_open = Path.open

    class Flaky:
        def __init__(self, handle) -> None:
            self.handle, self.calls = handle, 0

        def readline(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 3:
                raise OSError(5, "Input/output error")
            return self.handle.readline(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Flaky(real_open(self, *a, **k)))
    with pytest.raises(DataError) as excinfo:
        load_dir(tmp_path)
    assert f"{file}:3: cannot read: Input/output error" in _message(excinfo)


def test_unreadable_shakespeare_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "tiny.txt"
    file.write_text("A:\nx\n", encoding="utf-8")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_common, "open", denied, raising=False)
    with pytest.raises(DataError) as excinfo:
        load_tinyshakespeare(file)
    assert f"{file}: cannot read: Permission denied" in _message(excinfo)


# --------------------------------------------------------------------------- empty corpora


def test_tinyshakespeare_empty_file_and_no_usable_speaker(tmp_path: Path) -> None:
    file = tmp_path / "tiny.txt"
    file.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no speech blocks found"):
        load_tinyshakespeare(file)
    file.write_text("ALICE:\nOnce.\n\nBOB:\nOnce too.\n", encoding="utf-8")  # every speaker has 1 speech
    with pytest.raises(DataError) as excinfo:
        load_tinyshakespeare(file)
    assert f"{file}: no speaker has at least 2 speeches" in _message(excinfo)


def test_mit_plays_with_no_usable_role(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "full.html").write_text(
        "<html>\n<h3>SCENE I.</h3>\n<A NAME=speech1><b>ALICE</b></a>\n<A NAME=1.1.1>Only line.</A><br>\n",
        encoding="ascii",
    )
    with pytest.raises(DataError) as excinfo:
        load_shakespeare(tmp_path)
    assert f"{tmp_path}: no speaking role has at least 2 lines" in _message(excinfo)
    (tmp_path / "p" / "full.html").write_text("", encoding="ascii")
    with pytest.raises(DataError, match="no speaking role"):
        load_shakespeare(tmp_path)


def test_empty_jsonl_file(tmp_path: Path) -> None:
    file = tmp_path / "empty.jsonl"
    file.write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_corpus("jsonl", file, num_clients=1, seed=0)
    assert f"{file}: no rows found" in _message(excinfo)


# --------------------------------------------------------------------------- properties


_LINES = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda c, t: json.dumps({"client_id": c, "text": t}).encode(),
              st.text(max_size=5), st.text(max_size=10)),
    st.sampled_from([b"", b"\r", b"\xef\xbb\xbf", b'{"client_id": 1}', b'{"text": "\\ud83d"}', b"[" * 3000,
                     b"NAME:", b"<A NAME=speech1><b>X</b></a>", b"<A NAME=1.1.1>l</A><br>", b"<h3>"]),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINES, max_size=8), sep=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_bytes_load_or_fail_with_one_line_naming_the_file(tmp_path: Path, lines: list[bytes], sep: bytes) -> None:
    content = sep.join(lines)
    root = tmp_path / "case"
    root.mkdir(exist_ok=True)
    (root / "play").mkdir(exist_ok=True)
    files = {
        "jsonl": root / "all.jsonl",
        "dir": root / "u1.txt",
        "dir-jsonl": root / "u2.jsonl",
        "tinyshakespeare": root / "tiny.txt",
        "shakespeare": root / "play" / "full.html",
    }
    for file in files.values():
        file.write_bytes(content)
    loaders = [
        (lambda: load_jsonl(files["jsonl"]), files["jsonl"]),
        (lambda: load_dir(root), root),
        (lambda: load_tinyshakespeare(files["tinyshakespeare"]), files["tinyshakespeare"]),
        (lambda: load_shakespeare(root), root),
    ]
    for load, named in loaders:
        try:
            corpus = load()
        except DataError as e:
            message = str(e)
            assert message and "\n" not in message and message.isprintable(), repr(message)
            assert str(named) in message, message
        else:
            assert corpus.num_clients > 0
            for client in corpus.clients:  # everything a run does with the text must work
                client.train.encode("utf-8")
                client.test.encode("utf-8")
                client.client_id.encode("utf-8")


# --------------------------------------------------------------------------- the CLI


def test_cli_bad_data_is_one_line_exit_2(tmp_path: Path) -> None:
    from privlm.cli import app

    file = tmp_path / "rows.jsonl"
    file.write_text('{"client_id": "a", "text": "ok"}\n{"client_id": "a", "text": "\\ud800"}\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["run", "--set", "data.source=jsonl", "--set", f'data.path="{file}"'])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and f"{file}:2: field 'text' is not valid Unicode" in lines[0], res.output
