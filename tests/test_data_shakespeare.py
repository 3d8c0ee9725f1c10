"""Shakespeare (MIT HTML) and tiny-shakespeare loaders, and the shared split rule."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from privlm.data._common import split_records, train_count
from privlm.data.mit_shakespeare import PLAYS, load_shakespeare
from privlm.data.tinyshakespeare import load_tinyshakespeare
from privlm.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED / "shakespeare").is_dir() or not (SHARED / "tinyshakespeare.txt").is_file(),
    reason=f"shared test data not found at {SHARED} (expected shared/ beside the repository)",
)


def _n_records(text: str) -> int:
    return text.count("\n") + 1


# --------------------------------------------------------------------------- split rule


@pytest.mark.parametrize(
    ("n", "n_train"),
    [(2, 1), (3, 2), (4, 3), (5, 4), (6, 4), (9, 7), (10, 8), (11, 8), (15, 12), (35, 28), (1495, 1196)],
)
def test_train_count_is_int_of_80_percent_with_one_test_record(n: int, n_train: int) -> None:
    assert train_count(n) == n_train
    assert n - train_count(n) >= 1


def test_train_count_rejects_fewer_than_two_records() -> None:
    with pytest.raises(ValueError):
        train_count(1)


def test_split_records_keeps_order_and_joins_with_newlines() -> None:
    assert split_records(["a", "b", "c", "d", "e"]) == ("a\nb\nc\nd", "e")
    assert split_records(["x", "y"]) == ("x", "y")


# --------------------------------------------------------------------------- MIT shakespeare, real data


@pytest.fixture(scope="module")
def shakespeare():
    if not (SHARED / "shakespeare").is_dir():
        pytest.skip(f"shared test data not found at {SHARED / 'shakespeare'}")
    start = time.perf_counter()
    corpus = load_shakespeare(SHARED / "shakespeare")
    return corpus, time.perf_counter() - start


@needs_shared
def test_shakespeare_counts_match_the_readme(shakespeare) -> None:
    corpus, _ = shakespeare
    # README (shared/data/README.md): 108,035 role lines; 1,340 (play, role) pairs and
    # 1,228 with >= 2 lines. We also collapse runs of spaces in speaker names, which
    # merges romeo_juliet "LADY  CAPULET" into "LADY CAPULET": one pair fewer.
    assert corpus.info["plays"] == 37
    assert corpus.info["lines"] == 108_035
    assert corpus.info["roles"] == 1_339
    assert corpus.num_clients == 1_227
    stats = corpus.stats()
    # The README's 4,224,549 characters of text (no newlines) in the >= 2-line roles.
    newlines = sum(c.train.count("\n") + c.test.count("\n") for c in corpus.clients)
    assert stats["train_chars"] + stats["test_chars"] - newlines == 4_224_549
    # int(0.8 n) training lines per role (LEAF: "about 3.49 M" counts a newline per line
    # and rounds the other way, 3,488,474).
    assert stats["train_chars"] == 3_455_245
    assert stats["test_chars"] == 874_773




@needs_shared
def test_shakespeare_clients_are_sorted_split_and_clean(shakespeare) -> None:
    corpus, _ = shakespeare
    ids = [c.client_id for c in corpus.clients]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for client in corpus.clients:
        play, speaker = client.client_id.split("/", 1)
        assert play in PLAYS
        assert speaker == speaker.upper() and "  " not in speaker
        n_train, n_test = _n_records(client.train), _n_records(client.test)
        assert n_train == train_count(n_train + n_test)
        assert client.train and client.test
        for text in (client.train, client.test):
            assert "<" not in text and ">" not in text  # no markup, no stage-direction tags


@needs_shared
def test_shakespeare_hamlet_lines_and_unlabelled_prologue(shakespeare) -> None:
    corpus, _ = shakespeare
    clients = {c.client_id: c for c in corpus.clients}
    hamlet = clients["hamlet/HAMLET"]
    assert hamlet.train.startswith("[Aside]  A little more than kin, and less than kind.\n")
    assert (_n_records(hamlet.train), _n_records(hamlet.test)) == (1196, 299)
    # Upper-cased speakers merge "Nurse" and "NURSE".
    assert "romeo_juliet/NURSE" in clients and "romeo_juliet/Nurse" not in clients
    # The Romeo and Juliet prologue comes before any speaker tag: no role speaks it.
    assert not any("Two households, both alike in dignity" in c.train + c.test for c in corpus.clients)


# --------------------------------------------------------------------------- MIT format rules on a small file


_MINI_PLAY = """\
<html>
<tr><td class="play" align="center">A Small Play
<H3>ACT I</h3>
<h3>PROLOGUE</h3>
<blockquote>
<A NAME=1.0.1>Nobody speaks this prologue.</A><br>
</blockquote>
<h3>SCENE I. A room.</h3>
<p><blockquote>
<i>Enter ALICE and Bob</i>
</blockquote>
<A NAME=speech1><b>ALICE</b></a>
<blockquote>
<A NAME=1.1.1>One.</A><br>
<A NAME=1.1.2>Two.</A><br>
<p><i>Exit BOB</i></p>
<A NAME=1.1.3>Three.</A><br>
</blockquote>
<A NAME=speech2><b>Bob</b></a>
<blockquote>
<A NAME=1.1.4>Only line of Bob.</A><br>
</blockquote>
<h3>SCENE II. Another room.</h3>
<blockquote>
<A NAME=1.2.1>A letter read by nobody.</A><br>
</blockquote>
<A NAME=speech1><b>Alice</b></a>
<blockquote>
<A NAME=1.2.2>Four.</A><br>
<A NAME=1.2.3>Five & c.</A><br>
</blockquote>
<A NAME=speech2><b>First  Lord</b></a>
<blockquote>
<A NAME=1.2.4>Lord one.</A><br>
</blockquote>
<A NAME=speech3><b>FIRST LORD</b></a>
<blockquote>
<A NAME=1.2.5>Lord two.</A><br>
</blockquote>
"""


def _write_play(root: Path, play: str, html: str) -> None:
    (root / play).mkdir(parents=True)
    (root / play / "full.html").write_text(html, encoding="ascii")


def test_shakespeare_parsing_rules_on_a_small_play(tmp_path: Path) -> None:
    _write_play(tmp_path, "mini", _MINI_PLAY)
    corpus = load_shakespeare(tmp_path)
    clients = {c.client_id: c for c in corpus.clients}
    # BOB has one line: dropped. Names are upper-cased and spaces collapsed.
    assert sorted(clients) == ["mini/ALICE", "mini/FIRST LORD"]
    assert clients["mini/ALICE"].train == "One.\nTwo.\nThree.\nFour."
    assert clients["mini/ALICE"].test == "Five & c."
    assert clients["mini/FIRST LORD"].train == "Lord one."
    assert clients["mini/FIRST LORD"].test == "Lord two."
    assert corpus.info["roles"] == 3 and corpus.info["lines"] == 8
    assert corpus.info["dropped_clients"] == 1


def test_shakespeare_missing_directory_names_path_and_download_command(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as excinfo:
        load_shakespeare(missing)
    message = str(excinfo.value)
    assert str(missing) in message and "privlm data download shakespeare" in message


def test_shakespeare_directory_without_plays_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_shakespeare(tmp_path)
    assert str(tmp_path) in str(excinfo.value)
    assert "privlm data download shakespeare" in str(excinfo.value)


def test_shakespeare_non_utf8_play_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "full.html").write_bytes(b"<html>\n<h3>SCENE I.</h3>\n<A NAME=1.1.1>caf\xe9</A><br>\n")
    with pytest.raises(DataError, match=r"bad[/\\]full\.html:3: not valid UTF-8"):
        load_shakespeare(tmp_path)


# --------------------------------------------------------------------------- tiny shakespeare


@needs_shared
def test_tinyshakespeare_real_file_counts() -> None:
    corpus = load_tinyshakespeare(SHARED / "tinyshakespeare.txt")
    # README: 7,222 blocks; 125 of them are a name line with no speech (skipped).
    assert corpus.info["speeches"] == 7_097
    # README: 309 distinct names; upper-casing merges 6 (e.g. Nurse/NURSE) and 11
    # names only ever have empty blocks.
    assert corpus.info["speakers"] == 292
    assert corpus.num_clients == 245
    stats = corpus.stats()
    assert (stats["train_chars"], stats["test_chars"]) == (796_488, 224_943)
    ids = [c.client_id for c in corpus.clients]
    assert ids == sorted(ids)
    assert "GLOUCESTER" in ids and "NURSE" in ids and "Nurse" not in ids
    gloucester = next(c for c in corpus.clients if c.client_id == "GLOUCESTER")
    assert "GLOUCESTER:" not in gloucester.train  # name lines are not text


@needs_shared
def test_tinyshakespeare_accepts_directory_with_the_file() -> None:
    assert load_tinyshakespeare(SHARED).num_clients == 245


def test_tinyshakespeare_blocks_and_split(tmp_path: Path) -> None:
    text = (
        "First Citizen:\nBefore we proceed.\nHear me speak.\n\n"
        "All:\nSpeak, speak.\n\n\n"
        "FIRST CITIZEN:\nYou are all resolved?\n\n"
        "TITUS:\n\n"
        "First Citizen:\nThird speech.\n\n"
        "ALL:\nResolved.\n\n"
        "Lonely:\nOnly once.\n"
    )
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    corpus = load_tinyshakespeare(tmp_path)
    clients = {c.client_id: c for c in corpus.clients}
    assert sorted(clients) == ["ALL", "FIRST CITIZEN"]  # TITUS: empty; LONELY: one speech
    assert clients["FIRST CITIZEN"].train == "Before we proceed.\nHear me speak.\nYou are all resolved?"
    assert clients["FIRST CITIZEN"].test == "Third speech."
    assert (clients["ALL"].train, clients["ALL"].test) == ("Speak, speak.", "Resolved.")


def test_tinyshakespeare_block_without_speaker_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "tiny.txt"
    file.write_text("ALICE:\nHello.\n\nno speaker here\nstill none\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"tiny\.txt:4: expected a speaker line"):
        load_tinyshakespeare(file)


def test_tinyshakespeare_missing_path_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="privlm data download tinyshakespeare"):
        load_tinyshakespeare(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="privlm data download tinyshakespeare"):
        load_tinyshakespeare(tmp_path)  # a directory without the file
