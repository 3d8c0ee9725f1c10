"""PII detection and scrubbing (Presidio, offline): recall, operators, no network, CLI, run integration."""

from __future__ import annotations

import json
import socket
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from privlm import pii
from privlm.cli import app
from privlm.config import load_config
from privlm.data import generate_clinic_with_pii
from privlm.data.corpus import ClientData
from privlm.data.scrub import ScrubSettings, scrub_client
from privlm.errors import ConfigError, DataError
from privlm.pii import Detector, Scrubber, evaluate, read_gold

REQUIRED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE")
TEXT = ("Hi Dr. Obrien, this is Yolanda Brown (MRN 20221671, DOB 12/14/1960). Call me at (723) 923-2994 "
        "or write to y.brown9@comcast.net; I moved to 977 Donna Summit Apt. 219, West Stephanietown, OK 73074.")


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


def test_presidio_synth_recall_pattern_only(shared_data, detector):
    report = evaluate(detector, read_gold(shared_data / "presidio_synth_dataset_v2.json"))
    for etype in REQUIRED:
        assert report[etype]["recall"] >= 0.99, (etype, report[etype])


def test_clinic_recall_every_planted_type(detector):
    corpus, spans = generate_clinic_with_pii(60, seed=3)
    gold = defaultdict(list)
    for s in spans:
        gold[(s["client_id"], s["split"])].append((s["entity_type"], s["start"], s["end"]))
    docs = [(getattr(c, split), gold[(c.client_id, split)]) for c in corpus.clients for split in ("train", "test")]
    report = evaluate(detector, docs)
    planted = {pii.GOLD_TYPE_MAP.get(s["entity_type"], s["entity_type"]) for s in spans}
    assert planted == {"PERSON", "PHONE_NUMBER", "EMAIL_ADDRESS", "MEDICAL_RECORD_NUMBER", "DATE_TIME", "ADDRESS"}
    for etype in planted:
        assert report[etype]["recall"] >= 0.99, (etype, report[etype])


def test_recall_counts_a_partly_masked_value_as_missed():
    class Half:  # detects only the first half of every phone number
        def analyze_many(self, texts):
            from presidio_analyzer import RecognizerResult

            for _ in texts:
                yield [RecognizerResult("PHONE_NUMBER", 0, 4, 1.0)]

    report = evaluate(Half(), [("555-867-5309", [("PHONE_NUMBER", 0, 12)])])
    assert report["PHONE_NUMBER"]["recall"] == 0.0 and report["PHONE_NUMBER"]["precision"] == 1.0


def test_placeholder_scrub_replaces_every_value(detector):
    text, counts = Scrubber(detector).scrub(TEXT)
    for secret in ("Obrien", "Yolanda", "Brown", "20221671", "1960", "923-2994", "comcast", "Donna Summit", "73074"):
        assert secret not in text
    assert counts == {"PERSON": 2, "MEDICAL_RECORD_NUMBER": 1, "DATE_TIME": 1, "PHONE_NUMBER": 1,
                      "EMAIL_ADDRESS": 1, "ADDRESS": 1}
    assert text.startswith("Hi Dr. <PERSON>, this is <PERSON> (MRN <MEDICAL_RECORD_NUMBER>")


@pytest.mark.parametrize("operator", ["placeholder", "pseudonym"])
def test_scrubbing_is_idempotent(detector, operator):
    scrubber = Scrubber(detector, operator, salt=b"k" * 16)
    once, _ = scrubber.scrub(TEXT)
    twice, counts = scrubber.scrub(once)
    assert twice == once and not counts


def test_pseudonyms_consistent_within_a_client_not_across(detector):
    a, b = Scrubber(detector, "pseudonym"), Scrubber(detector, "pseudonym")
    a1, _ = a.scrub("Call Yolanda Brown at (723) 923-2994.")
    a2, _ = a.scrub("Yolanda Brown never answers (723) 923-2994.")
    b1, _ = b.scrub("Call Yolanda Brown at (723) 923-2994.")
    fake_name = a1.removeprefix("Call ").split(" at ")[0]
    fake_phone = a1.split(" at ")[1].rstrip(".")
    assert "Yolanda" not in a1 and "923-2994" not in a1
    assert a2 == f"{fake_name} never answers {fake_phone}."
    assert b1 != a1  # another client's key: no link between the two
    assert len(fake_phone) == len("(723) 923-2994") and fake_phone[0] == "(" and fake_phone[4:6] == ") "


def test_scrub_client_keeps_ids_and_returns_counts_only(detector):
    client = ClientData("patient-1", "Pt: Brown, Yolanda, MRN 20221671\nok", "Call (723) 923-2994")
    scrubbed, counts = scrub_client(client, detector, ScrubSettings())
    assert scrubbed.client_id == "patient-1"
    assert scrubbed.train == "Pt: <PERSON>, <PERSON>, MRN <MEDICAL_RECORD_NUMBER>\nok"
    assert scrubbed.test == "Call <PHONE_NUMBER>"
    assert dict(counts) == {"PERSON": 2, "MEDICAL_RECORD_NUMBER": 1, "PHONE_NUMBER": 1}


def test_no_network_attempt_while_scrubbing(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # The guard works: tldextract without privlm's settings tries to fetch the suffix list.
    import tldextract

    tldextract.TLDExtract(cache_dir=None)("someone@example.co.uk")
    assert attempts, "the socket guard did not see tldextract's fetch"
    attempts.clear()
    pii._offline_tld.cache_clear()
    detector = Detector()
    text, counts = Scrubber(detector, "pseudonym").scrub(TEXT + " Mail a.b@mail.example.co.uk or 10.1.2.3.")
    assert counts["EMAIL_ADDRESS"] == 2 and counts["IP_ADDRESS"] == 1
    assert attempts == []


def test_missing_spacy_model_is_an_error_not_a_download(monkeypatch):
    import spacy.cli

    def no_download(*a, **k):
        raise AssertionError("tried to download a spaCy model")

    monkeypatch.setattr(spacy.cli, "download", no_download)
    with pytest.raises(ConfigError, match="data.scrub.spacy_model: 'en_core_web_nothere' is neither"):
        Detector(spacy_model="en_core_web_nothere")


def test_config_scrub_section():
    assert load_config(None).data.scrub_enabled  # on for the synthetic clinic
    assert not load_config(None, ["data.source=shakespeare"]).data.scrub_enabled
    assert load_config(None, ["data.source=shakespeare", "data.scrub.enabled=true"]).data.scrub_enabled
    with pytest.raises(ConfigError, match=r"data\.scrub\.entities: unknown entity type 'SSN'"):
        load_config(None, ['data.scrub.entities=["SSN"]'])
    with pytest.raises(ConfigError, match=r"data\.scrub\.operator"):
        load_config(None, ['data.scrub.operator="redact"'])
    with pytest.raises(ConfigError, match=r"data\.scrub\.mode: unknown key"):
        load_config(None, ["data.scrub.mode=1"])


def test_entities_limit_what_is_scrubbed():
    text, counts = Scrubber(Detector(["EMAIL_ADDRESS"])).scrub(TEXT)
    assert dict(counts) == {"EMAIL_ADDRESS": 1} and "Yolanda Brown" in text


def test_read_gold_errors(tmp_path):
    bad = tmp_path / "gold.json"
    bad.write_text('{"full_text": "x"}')
    with pytest.raises(DataError, match="gold.json: expected a JSON list"):
        read_gold(bad)
    bad.write_text('[{"full_text": "abc", "spans": [{"entity_type": "X", "start_position": 1, "end_position": 9}]}]')
    with pytest.raises(DataError, match="record 0: a span lies outside full_text"):
        read_gold(bad)
    with pytest.raises(DataError, match="gold file not found"):
        read_gold(tmp_path / "nope.json")


def test_cli_scrub_txt_jsonl_and_dir(tmp_path):
    runner = CliRunner()
    src = tmp_path / "notes.txt"
    src.write_text("Call Yolanda Brown at (723) 923-2994.\nnothing here\n")
    r = runner.invoke(app, ["scrub", str(src), str(tmp_path / "out.txt"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out.txt").read_text() == "Call <PERSON> at <PHONE_NUMBER>.\nnothing here\n"
    assert "PERSON 1" in r.output and "PHONE_NUMBER 1" in r.output
    # never overwrites
    r = runner.invoke(app, ["scrub", str(src), str(tmp_path / "out.txt"), "--no-progress"])
    assert r.exit_code == 2 and "already exists" in r.output

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"client_id": "a", "text": "Mail y.brown9@comcast.net", "n": 1}) + "\n"
                    + json.dumps({"client_id": "a", "text": "y.brown9@comcast.net again"}) + "\n")
    r = runner.invoke(app, ["scrub", str(rows), str(tmp_path / "rows-out.jsonl"), "--format", "jsonl",
                            "--operator", "pseudonym", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in (tmp_path / "rows-out.jsonl").read_text().splitlines()]
    fake = out[0]["text"].removeprefix("Mail ")
    assert out[0]["n"] == 1 and "comcast" not in fake and out[1]["text"] == f"{fake} again"

    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "c1.txt").write_text("MRN 1234567")
    r = runner.invoke(app, ["scrub", str(tmp_path / "in"), str(tmp_path / "outdir"), "--no-progress",
                            "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "outdir" / "sub" / "c1.txt").read_text() == "MRN <MEDICAL_RECORD_NUMBER>"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    r = runner.invoke(app, ["scrub", str(bad), str(tmp_path / "bad-out.jsonl"), "--format", "jsonl"])
    assert r.exit_code == 2 and "bad.jsonl:1: field 'text' must be a string" in r.output
    assert not (tmp_path / "bad-out.jsonl").exists()


def test_cli_scrub_eval(shared_data, tmp_path):
    out = tmp_path / "scores.json"
    r = CliRunner().invoke(app, ["scrub-eval", str(shared_data / "presidio_synth_dataset_v2.json"),
                                 "--entities", ",".join(REQUIRED), "--json", str(out)])
    assert r.exit_code == 0, r.output
    scores = json.loads(out.read_text())
    assert all(scores[e]["recall"] >= 0.99 for e in REQUIRED)
    r = CliRunner().invoke(app, ["scrub-eval", str(shared_data / "presidio_synth_dataset_v2.json"),
                                 "--entities", "NOPE"])
    assert r.exit_code == 2 and "--entities: unknown entity type 'NOPE'" in r.output


def test_run_scrubs_on_the_clients_and_reports_counts(tmp_path):
    from privlm.api import Simulation

    cfg = load_config(None, ["data.num_clients=12", "federation.rounds=1", "federation.clients_per_round=4",
                             "privacy.mode=none", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                             "client.local_steps=1", "eval.max_clients=12"])
    sim = Simulation(cfg)
    _, spans = generate_clinic_with_pii(12, seed=cfg.seed)
    values = {s["value"] for s in spans if s["entity_type"] in ("EMAIL_ADDRESS", "MEDICAL_RECORD_NUMBER", "PHONE_NUMBER")}
    texts = "\n".join(c.train + c.test for c in sim.corpus.clients)
    assert values and not [v for v in values if v in texts]
    res = sim.run(tmp_path / "run", progress=False)
    scrub = json.loads((res.run_dir / "scrub.json").read_text())
    assert scrub["counts"] == sim.scrub_counts and scrub["counts"]["EMAIL_ADDRESS"] > 0
    assert scrub["clients"] == 12 and scrub["detector"] == "patterns"
    assert "PII scrubbing" in (res.run_dir / "report.html").read_text()
    # `privlm eval` scores the held-out text as the clients saw it: scrubbed, as the run did.
    from privlm.inference import evaluate_run

    _, loss, acc, _ = evaluate_run(res.run_dir)
    assert loss == pytest.approx(res.eval_loss, rel=1e-5) and acc == pytest.approx(res.eval_accuracy, rel=1e-5)


def test_scrubbing_is_the_same_in_every_process(tmp_path):
    """Resume replays a seeded run bit for bit, so scrubbing must not depend on hash order."""
    import os
    import subprocess
    import sys

    code = ("import hashlib\nfrom privlm.data import generate_clinic\nfrom privlm.data.scrub import scrub_corpus, "
            "ScrubSettings\nc, _ = scrub_corpus(generate_clinic(10, 0), ScrubSettings(), progress=False)\n"
            "print(hashlib.sha256(''.join(x.train + x.test for x in c.clients).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)}
    assert len(outs) == 1
