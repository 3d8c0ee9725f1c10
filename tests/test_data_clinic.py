"""The synthetic clinic corpus: determinism, size, speed and planted PII ground truth."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import privlm
from privlm.data.clinic import ENTITY_TYPES, example_text, generate_clinic, generate_clinic_with_pii
from privlm.data.clinic_vocab import ACUTE_PROBLEMS, CONDITIONS, LABS, MEDICATIONS
from privlm.errors import ConfigError


@pytest.fixture(scope="module")
def big():
    """5,000 patients (the speed target), generated once for this module."""
    start = time.perf_counter()
    corpus, spans = generate_clinic_with_pii(5000, seed=0)
    return corpus, spans, time.perf_counter() - start


def test_5000_patients_are_generated(big) -> None:
    # (its speed is a benchmark figure, not a test: a loaded machine must not fail the suite)
    corpus, _, _seconds = big
    assert corpus.num_clients == 5000


def test_size_per_patient_is_in_the_target_range(big) -> None:
    corpus, _, _ = big
    stats = corpus.stats()
    mean_train = stats["train_chars"] / corpus.num_clients
    assert 400 <= mean_train <= 1500
    # Last 20% of records are held out: the test share of the text is about a fifth.
    assert 0.15 < stats["test_chars"] / (stats["train_chars"] + stats["test_chars"]) < 0.35
    assert all(c.train and c.test for c in corpus.clients)
    records_per_patient = corpus.info["records"] / corpus.num_clients
    assert 4 <= records_per_patient <= 12


def test_text_is_ascii_and_fully_rendered(big) -> None:
    corpus, _, _ = big
    for client in corpus.clients:
        text = client.train + client.test
        assert text.isascii(), client.client_id
        assert "{" not in text and "}" not in text, client.client_id


def test_client_ids(big) -> None:
    corpus, _, _ = big
    assert [c.client_id for c in corpus.clients[:3]] == ["patient-00000", "patient-00001", "patient-00002"]
    assert corpus.clients[-1].client_id == "patient-04999"


def test_pii_spans_point_at_their_values(big) -> None:
    corpus, spans, _ = big
    clients = {c.client_id: c for c in corpus.clients}
    for span in spans:
        text = getattr(clients[span["client_id"]], span["split"])
        assert text[span["start"] : span["end"]] == span["value"], span
        assert span["entity_type"] in ENTITY_TYPES
    counts = Counter(span["entity_type"] for span in spans)
    assert set(counts) == set(ENTITY_TYPES)
    assert {s["split"] for s in spans} == {"train", "test"}
    # Every patient's chart names people (patient, doctor, nurse or contact).
    assert {s["client_id"] for s in spans if s["entity_type"] == "PERSON"} == set(clients)


def test_pii_spans_do_not_overlap(big) -> None:
    _, spans, _ = big
    by_text: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for span in spans:
        by_text.setdefault((span["client_id"], span["split"]), []).append((span["start"], span["end"]))
    for ranges in by_text.values():
        ranges.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))


def test_pii_formats_vary(big) -> None:
    _, spans, _ = big
    phone_shapes = {re.sub(r"\d", "9", s["value"]) for s in spans if s["entity_type"] == "PHONE_NUMBER"}
    assert {"(999) 999-9999", "999-999-9999", "999.999.9999", "9999999999", "+9 999-999-9999"} <= phone_shapes
    dob_shapes = {re.sub(r"\d", "9", re.sub(r"[A-Za-z]+", "M", s["value"])) for s in spans if s["entity_type"] == "DATE_OF_BIRTH"}
    assert len(dob_shapes) >= 5
    mrns = [s["value"] for s in spans if s["entity_type"] == "MEDICAL_RECORD_NUMBER"]
    assert all(m.isdigit() and 7 <= len(m) <= 8 for m in mrns)
    emails = [s["value"] for s in spans if s["entity_type"] == "EMAIL_ADDRESS"]
    assert all(re.fullmatch(r"[a-z0-9._]+@[a-z]+\.[a-z]+", e) for e in emails)


def test_one_patient_keeps_the_same_identity(big) -> None:
    corpus, spans, _ = big
    client = corpus.clients[7]
    mine = [s for s in spans if s["client_id"] == client.client_id]
    assert len({s["value"] for s in mine if s["entity_type"] == "MEDICAL_RECORD_NUMBER"}) <= 1
    assert len({s["value"] for s in mine if s["entity_type"] == "EMAIL_ADDRESS"}) <= 1
    phones = {re.sub(r"\D", "", s["value"])[-10:] for s in mine if s["entity_type"] == "PHONE_NUMBER"}
    assert len(phones) <= 2  # the patient's and the emergency contact's


def test_same_seed_same_text_other_seed_other_text() -> None:
    first = generate_clinic(40, seed=3)
    again = generate_clinic(40, seed=3)
    other = generate_clinic(40, seed=4)
    assert first == again
    assert [c.train for c in first.clients] != [c.train for c in other.clients]
    # Patient i does not depend on how many patients are generated.
    assert generate_clinic(10, seed=3).clients == first.clients[:10]


def test_same_text_in_another_process_with_other_hash_seed() -> None:
    """No dependence on set/dict hash order: a fresh interpreter makes the same text."""
    code = (
        "import hashlib, sys; from privlm.data.clinic import generate_clinic_with_pii; "
        "c, s = generate_clinic_with_pii(60, 9); sys.stdout.write(hashlib.sha256(repr((c, s)).encode()).hexdigest())"
    )
    src = str(Path(privlm.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    here = hashlib.sha256(repr(generate_clinic_with_pii(60, 9)).encode()).hexdigest()
    assert out.stdout == here


def test_text_reads_like_a_clinic(big) -> None:
    corpus, _, _ = big
    text = "\n".join(c.train for c in corpus.clients[:300])
    for marker in ("Chief complaint", "DOB", "MRN", "Dr. ", " mg ", "BP ", "refill", "Hi Dr.", "RN", "(ref "):
        assert marker in text, marker
    medications_seen = sum(1 for name in MEDICATIONS if name in text)
    assert medications_seen >= 40
    conditions_seen = sum(1 for c in CONDITIONS if c.name in text)
    assert conditions_seen >= 30


def test_vocabulary_is_large_enough() -> None:
    assert len(CONDITIONS) >= 40
    assert len(MEDICATIONS) >= 40
    assert len(ACUTE_PROBLEMS) >= 30
    for condition in CONDITIONS:
        assert all(m in MEDICATIONS for m in condition.meds), condition.name
        assert all(lab in LABS for lab in condition.labs), condition.name


def test_example_text_is_patient_zero() -> None:
    client = generate_clinic(1, seed=0).clients[0]
    text = example_text()
    assert text == client.train + "\n" + client.test
    assert text.isascii() and len(text) > 300


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_clients_must_be_positive(bad) -> None:
    with pytest.raises(ConfigError, match="data.num_clients"):
        generate_clinic(bad, seed=0)
