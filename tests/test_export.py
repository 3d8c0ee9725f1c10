"""``privlm export`` (issue #25.2): transformers loads the export and generates; the model card's
numbers are privacy.json's; an epsilon the ledger cannot reproduce is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privlm.api import Simulation
from privlm.config import load_config
from privlm.errors import PrivlmError
from privlm.export import card_metadata, export_run
from privlm.inference import load_run_model

transformers = pytest.importorskip("transformers")

TINY = ["data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=false",
        "model.n_layer=2", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
        "federation.rounds=2", "federation.clients_per_round=6", "client.local_steps=1",
        "client.batch_size=4", "eval.max_clients=4", "report.prompts=[]", "privacy.noise_multiplier=1.0"]
CARD_KEYS = ("epsilon", "delta", "unit", "accountant", "rounds_completed", "num_clients", "clip_norm",
             "noise_multiplier", "sampling_rate", "clients_per_round", "not_covered")


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt") / "run"
    Simulation(load_config(None, TINY)).run(out, progress=False)
    return out


def _logits_privlm(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    _, model, _, _ = load_run_model(run_dir)
    with torch.no_grad():
        return model(ids)


def test_a_from_scratch_gpt_loads_in_transformers_and_generates(gpt_run, tmp_path):
    res = export_run(gpt_run, tmp_path / "export")
    assert res["kind"] == "gpt2" and res["round"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert isinstance(model, transformers.GPT2LMHeadModel)
    text = "The patient: é ✓"  # (+ 8 new tokens within block_size 32)
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(text.encode("utf-8"))  # byte ids unchanged
    assert tok.model_max_length == 32  # the model's block_size: longer inputs are the model's limit
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, _logits_privlm(gpt_run, ids), rtol=1e-5, atol=1e-5)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.size(1) + 8) and isinstance(tok.decode(out[0]), str)


def test_the_card_numbers_are_privacy_json_and_the_ledger_travels(gpt_run, tmp_path):
    export_run(gpt_run, tmp_path / "export")
    privacy = json.loads((gpt_run / "privacy.json").read_text())
    meta = card_metadata(tmp_path / "export")
    assert meta["library_name"] == "transformers" and "differential-privacy" in meta["tags"]
    for key in CARD_KEYS:
        assert meta["privacy"][key] == privacy[key], key
    assert meta["privacy"]["mechanism"] == "user-level DP-FedAvg"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Privacy guarantee" in card and privacy["guarantee"] in card and "Privacy audit" not in card
    assert "Held-out" not in card and "held_out_metrics" not in meta  # only with include_metrics
    # The exported privacy.json reproduces the epsilon through the CLI.
    r = subprocess.run([sys.executable, "-m", "privlm", "epsilon", "--ledger", str(tmp_path / "export" / "privacy.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and abs(float(r.stdout.split()[0]) - privacy["epsilon"]) < 1e-3 * privacy["epsilon"]


def test_metrics_and_audit_only_where_asked_for_and_present(gpt_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(gpt_run, run)
    audit = {"round": 2, "claimed_epsilon": 1.0, "epsilon_lower_bound": 0.12, "broken": False,
             "membership": {"auc": 0.51}, "canaries": None}
    (run / "audit.json").write_text(json.dumps(audit))
    export_run(run, tmp_path / "plain")  # the audit's figures come from clients' data: not by default
    assert "privacy_audit" not in card_metadata(tmp_path / "plain")
    assert "Privacy audit" not in (tmp_path / "plain" / "README.md").read_text()
    export_run(run, tmp_path / "export", include_metrics=True, include_audit=True)
    meta = card_metadata(tmp_path / "export")
    assert meta["privacy_audit"] == {"round": 2, "claimed_epsilon": 1.0, "epsilon_lower_bound": 0.12,
                                     "broken": False, "membership_auc": 0.51}
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert meta["held_out_metrics"]["eval_accuracy"] == last["eval_accuracy"]
    assert "NOT covered" in (tmp_path / "export" / "README.md").read_text()
    (run / "audit.json").write_text(json.dumps({**audit, "round": 7}))  # not a checkpoint this run released
    with pytest.raises(PrivlmError, match="not an audit of a checkpoint of this run"):
        export_run(run, tmp_path / "stale", include_audit=True)


def test_an_edited_epsilon_or_ledger_is_refused_and_nothing_is_written(gpt_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    rec = json.loads((run / "privacy.json").read_text())
    (run / "privacy.json").write_text(json.dumps({**rec, "epsilon": rec["epsilon"] / 2}))
    with pytest.raises(PrivlmError, match="is not what its ledger gives"):
        export_run(run, tmp_path / "export")
    (run / "privacy.json").write_text(json.dumps({**rec, "ledger": rec["ledger"][:-1]}))
    with pytest.raises(PrivlmError, match="does not extend"):
        export_run(run, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no OUT, no partial directory


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_a_checkpoint_the_ledger_has_not_paid_for_is_refused(gpt_run, tmp_path):
    import shutil

    run = _copy(gpt_run, tmp_path / "run")
    shutil.copyfile(run / "checkpoints" / "round-0002.safetensors", run / "checkpoints" / "round-0500.safetensors")
    with pytest.raises(PrivlmError, match="no ledger entry for round 3, but checkpoint round 500 exists"):
        export_run(run, tmp_path / "a")
    run = _copy(gpt_run, tmp_path / "run2")  # no head, the ledger emptied, epsilon 0: a trained model
    (run / "ledger-head.json").unlink()
    (run / "state.safetensors").unlink()
    rec = json.loads((run / "privacy.json").read_text())
    (run / "privacy.json").write_text(json.dumps({**rec, "ledger": [], "epsilon": 0.0}))
    with pytest.raises(PrivlmError, match="missing, but checkpoint round 2 exists"):
        export_run(run, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_edited_fields_of_privacy_json_are_refused(gpt_run, tmp_path):
    rec = json.loads((gpt_run / "privacy.json").read_text())
    for edit, match in (({"weak": False}, "weak = False"), ({"secure_noise": False}, "secure_noise"),
                        ({"unit": "record"}, "unit"), ({"accountant": "rdp"}, "accountant"),
                        ({"mode": "none"}, "mode 'none' does not match")):
        run = _copy(gpt_run, tmp_path / f"run-{next(iter(edit))}")
        (run / "privacy.json").write_text(json.dumps({**rec, **edit}))
        with pytest.raises(PrivlmError, match=match):
            export_run(run, tmp_path / "out")
    run = _copy(gpt_run, tmp_path / "run-delta")  # config.toml holds the resolved delta: it must be the one stated
    (run / "privacy.json").write_text(json.dumps({**rec, "delta": 0.2}))
    with pytest.raises(PrivlmError, match="delta 0.2 is not config.toml's"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_live_run_is_refused(gpt_run, tmp_path):
    from privlm.rundir import RunDir

    run = _copy(gpt_run, tmp_path / "run")
    live = RunDir(run)
    live.lock()
    try:
        with pytest.raises(PrivlmError, match="in use by a live run"):
            export_run(run, tmp_path / "out")
    finally:
        live.unlock()


def test_out_must_be_new_and_outside_the_run(gpt_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(PrivlmError, match="not an empty directory"):
        export_run(gpt_run, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(PrivlmError, match="inside the run directory"):
        export_run(gpt_run, gpt_run / "export")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(PrivlmError, match="not an empty directory"):
        export_run(gpt_run, tmp_path / "link")
    with pytest.raises(PrivlmError, match="parent directory does not exist"):
        export_run(gpt_run, tmp_path / "no" / "such")
    (tmp_path / "empty").mkdir()
    export_run(gpt_run, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full", "link", "target"]  # no partial dirs


@pytest.mark.slow
def test_lstm_is_refused_with_one_line_through_the_cli(tmp_path):
    cfg = load_config(None, [*TINY, "model.kind=lstm", "model.lstm_hidden=8", "model.lstm_embed=4",
                             "model.lstm_layers=1"])
    Simulation(cfg).run(tmp_path / "run", progress=False)
    r = subprocess.run([sys.executable, "-m", "privlm", "export", str(tmp_path / "run"), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no transformers equivalent" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_non_private_run_says_there_is_no_guarantee(tmp_path):
    Simulation(load_config(None, [*TINY, "privacy.mode=none", "federation.rounds=1"])).run(tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "export")
    meta = card_metadata(tmp_path / "export")
    assert "epsilon" not in meta["privacy"] and meta["privacy"]["mode"] == "none"
    assert "None: this model was trained without differential privacy" in (tmp_path / "export" / "README.md").read_text()


def test_lora_runs_export_merged_or_as_an_adapter(tmp_path):
    from test_hf_lora import _cfg, _tiny

    from privlm.models.tokenizer import train_bpe
    from privlm.data.clinic import example_text

    train_bpe([example_text(seed=s) for s in range(30)], 400, tmp_path / "tok")
    base = _tiny("gpt2", tmp_path / "tok", tmp_path / "base")
    Simulation(_cfg(base)).run(tmp_path / "run", progress=False)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    ours = _logits_privlm(tmp_path / "run", ids)

    assert export_run(tmp_path / "run", tmp_path / "merged")["kind"] == "merged"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.generate(tok("The patient", return_tensors="pt").input_ids, max_new_tokens=4,
                           do_sample=False).shape[1] > 4
    assert card_metadata(tmp_path / "merged")["privacy"]["epsilon"] == json.loads(
        (tmp_path / "run" / "privacy.json").read_text())["epsilon"]

    from peft import PeftModel

    assert export_run(tmp_path / "run", tmp_path / "adapter", adapter_only=True)["kind"] == "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with_adapter = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                             tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    assert card_metadata(tmp_path / "adapter")["library_name"] == "peft"
