"""Crash safety: resume after a SIGKILL at every step of a round, the lock, corrupt files.

Crashes are real: a child process is killed with SIGKILL (by ``PRIVLM_CRASH_AT``
at a named step, or by a timer in the chaos test), then the run is resumed and
compared with the same run done without interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import tomli_w
from typer.testing import CliRunner

from privlm.cli import app
from privlm.config import load_config
from privlm.errors import DataError
from privlm.privacy import Ledger, epsilon_for
from privlm.privacy.ledger import LedgerEntry
from privlm.rundir import RunDir
from privlm.api import Simulation, resume

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import chaos  # noqa: E402

ROUNDS = 6
BASE = {
    "seed": 3,
    "data": {"source": "synthetic-clinic", "num_clients": 60},
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 32},
    "client": {"local_steps": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.01},
    "federation": {"rounds": ROUNDS, "clients_per_round": 8},
    "server": {"optimizer": "fedadam", "lr": 0.01},
    "privacy": {"mode": "user", "noise_multiplier": 1.0, "clip_norm": 1.0, "target_epsilon": 50.0},
    "eval": {"every": 2, "max_clients": 8},
    "output": {"checkpoint_every": 4},
}


def _config(tmp_path: Path, seeded: bool = True, **privacy) -> Path:
    cfg = json.loads(json.dumps(BASE))
    cfg["privacy"].update(seeded_noise=seeded, **privacy)
    path = tmp_path / f"config-{seeded}-{len(privacy)}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _crash(cfg_path: Path, out: Path, point: str) -> None:
    """Run in a child process that SIGKILLs itself at ``point``."""
    env = {**os.environ, "PRIVLM_CRASH_AT": point, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "privlm", "run", str(cfg_path), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    Simulation(load_config(_config(tmp), [])).run(out, progress=False)
    return out


# Every step of round 3 at which a crash leaves a different on-disk state, plus
# crashes inside file writes (temp file complete, rename not done).
# (Three are heavy, for the CI-time budget: the four others already cover the ledger paid with
# nothing else written, a checkpoint without its state, a finished round, and a torn write.)
_HEAVY = pytest.mark.heavy
POINTS = ["ledger-written:3", pytest.param("aggregated:3", marks=_HEAVY), pytest.param("metrics-written:3", marks=_HEAVY),
          "checkpoint-written:4", "state-written:3", "mid-write:9", pytest.param("mid-write-checkpoint:2", marks=_HEAVY)]


@pytest.mark.parametrize("point", POINTS)
def test_seeded_run_killed_anywhere_resumes_to_the_same_result(tmp_path, reference, point):
    out = tmp_path / "run"
    _crash(_config(tmp_path), out, point)
    before = json.loads((out / "privacy.json").read_text())
    res = resume(out, progress=False)
    assert res.rounds_completed == ROUNDS
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))
    got, want = chaos._final(out), chaos._final(reference)
    for key in want:
        assert got[key] == want[key], f"{key} differs after a crash at {point}"
    # What was spent before the crash is still in the ledger (a prefix of the final one).
    assert got["ledger"][: len(before["ledger"])] == before["ledger"]


def test_secure_noise_crash_keeps_the_lost_round_spent(tmp_path):
    out = tmp_path / "run"
    _crash(_config(tmp_path, seeded=False), out, "aggregated:3")
    spent = json.loads((out / "privacy.json").read_text())["ledger"]
    assert [e["round"] for e in spent] == [1, 2, 3]  # round 3 was paid before it ran
    res = resume(out, progress=False)
    priv = json.loads((out / "privacy.json").read_text())
    rounds = [(e["round"], e.get("lost", False)) for e in priv["ledger"]]
    assert rounds == [(1, False), (2, False), (3, True), (3, False), (4, False), (5, False), (6, False)]
    assert priv["rounds_lost"] == 1 and priv["rounds_spent"] == ROUNDS + 1
    assert res.rounds_completed == ROUNDS
    ledger = Ledger.from_list(priv["ledger"])
    assert priv["epsilon"] == pytest.approx(epsilon_for(ledger, priv["delta"], "pld"), rel=1e-12)
    assert priv["epsilon"] > epsilon_for(ledger.events[:ROUNDS], priv["delta"], "pld")
    assert "lost to a crash" in priv["guarantee"]


def test_secure_noise_crash_never_lets_the_budget_be_exceeded(tmp_path):
    # A budget that exactly fits ROUNDS rounds: after a lost round, the last one cannot run.
    q = BASE["federation"]["clients_per_round"] / BASE["data"]["num_clients"]
    from privlm.privacy import epsilon as eps_of

    delta = 1e-3
    budget = eps_of(q, 1.0, ROUNDS, delta, "pld") * (1 + 1e-9)
    out = tmp_path / "run"
    _crash(_config(tmp_path, seeded=False, max_epsilon=budget, delta=delta), out, "aggregated:2")
    res = resume(out, progress=False)
    priv = json.loads((out / "privacy.json").read_text())
    assert res.rounds_completed == ROUNDS - 1 and res.stopped and "budget stop" in res.stopped
    assert priv["epsilon"] <= budget and priv["rounds_spent"] == ROUNDS


@pytest.mark.heavy  # (56 s on 2 cores; every crash point of a round is in the tests above)
def test_chaos_short(tmp_path):
    """The CI version of tools/chaos.py: 4 random kills, resumed, bitwise equal at the end."""
    cfg = json.loads(json.dumps(chaos.CONFIG))  # 24 rounds: slack for 4 progress-triggered kills
    res = chaos.chaos(tmp_path, kills=4, seed=11, config=cfg, log=lambda *_: None)
    assert res["ok"], res
    assert len(res["kills"]) == 4


def test_a_live_run_holds_its_directory(tmp_path):
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.lock()
    try:
        with pytest.raises(DataError, match="in use by a live run"):
            Simulation(load_config(_config(tmp_path), [])).run(out, progress=False)
        with pytest.raises(DataError, match="in use by a live run"):
            Simulation(load_config(_config(tmp_path), [])).run(out, progress=False, resume=True)
    finally:
        holder.unlock()
    Simulation(load_config(_config(tmp_path), [])).run(out, progress=False)  # free again


def test_a_finished_run_cannot_be_started_over(tmp_path, reference):
    with pytest.raises(DataError, match="already holds a run"):
        Simulation(load_config(_config(tmp_path), [])).run(reference, progress=False)


def _broken_copy(reference: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    return out


def _set_z(entries: list[dict], z: float) -> None:
    for e in entries:
        e["event"]["event"]["noise_multiplier"] = z


@pytest.mark.parametrize("damage", ["truncate-state", "garbage-privacy", "no-state", "bad-ledger",
                                    "ledger-gap", "stale-ledger", "other-mode", "edited-z", "rechained-z",
                                    "noop-events", "rechained-noop", "no-head", "foreign-checkpoint"])
def test_corrupt_files_are_an_error_never_a_fresh_start(tmp_path, reference, damage):
    out = _broken_copy(reference, tmp_path)
    state, priv = out / "state.safetensors", out / "privacy.json"
    if damage == "truncate-state":
        state.write_bytes(state.read_bytes()[:100])
        match = "state.safetensors: corrupt"
    elif damage == "garbage-privacy":
        priv.write_text('{"ledger": [')
        match = "privacy.json: corrupt JSON"
    elif damage == "no-state":
        state.unlink()
        match = "state.safetensors: no resume state"
    elif damage == "bad-ledger":
        rec = json.loads(priv.read_text())
        rec["ledger"][1]["event"]["class"] = "os.system"
        priv.write_text(json.dumps(rec))
        match = "privacy.json: corrupt ledger"
    elif damage == "ledger-gap":
        rec = json.loads(priv.read_text())
        del rec["ledger"][2]
        priv.write_text(json.dumps(rec))
        match = r"entry 3 \(round 4\): its digest does not match"
    elif damage == "stale-ledger":  # an older privacy.json next to a newer state
        rec = json.loads(priv.read_text())
        del rec["ledger"][-1]
        priv.write_text(json.dumps(rec))
        match = "does not extend the 6 entries paid per ledger-head.json; refusing to under-count"
    elif damage == "edited-z":  # issue #18.2: every z raised to 5.0 would print a far smaller epsilon
        rec = json.loads(priv.read_text())
        _set_z(rec["ledger"], 5.0)
        priv.write_text(json.dumps(rec))
        match = r"entry 1 \(round 1\): its digest does not match"
    elif damage == "rechained-z":  # the same edit with a consistent hash chain and head file
        rec = json.loads(priv.read_text())
        _set_z(rec["ledger"], 5.0)
        forged = Ledger()
        for e in rec["ledger"]:
            le = LedgerEntry.from_dict({k: v for k, v in e.items() if k != "digest"})
            forged.append(le.round, le.event, le.lost, le.silo, le.clip_norm)
        rec["ledger"] = forged.to_list()
        priv.write_text(json.dumps(rec))
        RunDir(out).write_head(len(forged), forged.digest())
        match = "not the ones state.safetensors was saved after"
    elif damage == "noop-events":  # NoOpDpEvent costs nothing (banded MF pays it past k b rounds)
        rec = json.loads(priv.read_text())
        for e in rec["ledger"]:
            e["event"] = {"class": "NoOpDpEvent"}
        priv.write_text(json.dumps(rec))
        match = r"entry 1 \(round 1\): its digest does not match"
    elif damage == "rechained-noop":  # the same, with the chain, head file and resume state all forged
        rec = json.loads(priv.read_text())
        forged = Ledger()
        for e in rec["ledger"]:
            le = LedgerEntry.from_dict({k: v for k, v in e.items() if k != "digest"})
            forged.append(le.round, dp_accounting.NoOpDpEvent(), le.lost, le.silo, le.clip_norm)
        rec["ledger"] = forged.to_list()
        priv.write_text(json.dumps(rec))
        rd = RunDir(out)
        rd.write_head(len(forged), forged.digest())
        done, params, opt_state, _, mech, _ = rd.load_state()
        rd.save_state(done, params, opt_state, len(forged), mech, forged.digest())
        match = "round 1 was paid for with a different mechanism than config.toml describes"
    elif damage == "no-head":
        (out / "ledger-head.json").unlink()
        match = "ledger-head.json: missing"
    elif damage == "foreign-checkpoint":  # issue #26.4: a checkpoint this run never made
        (out / "checkpoints" / "round-0099.safetensors").write_bytes((out / "state.safetensors").read_bytes())
        match = "round-0099.safetensors: a checkpoint of a round the ledger never paid for"
    else:
        rec = json.loads(priv.read_text())
        rec["mode"] = "example"
        priv.write_text(json.dumps(rec))
        match = "does not match config.toml"
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(DataError, match=match):
        resume(out, progress=False)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing was overwritten


def test_a_ledger_entry_deleted_after_a_crash_is_refused(tmp_path):
    """Issue #18.2: a crash after round 3 was paid; deleting that entry must not un-pay it."""
    out = tmp_path / "run"
    _crash(_config(tmp_path, seeded=False), out, "ledger-written:3")
    priv = out / "privacy.json"
    rec = json.loads(priv.read_text())
    assert [e["round"] for e in rec["ledger"]] == [1, 2, 3]
    del rec["ledger"][-1]
    priv.write_text(json.dumps(rec))
    with pytest.raises(DataError, match="does not extend the 3 entries paid"):
        resume(out, progress=False)


def test_a_crash_after_marking_a_round_lost_still_resumes(tmp_path):
    """The lost mark is an annotation outside the hash chain: privacy.json rewritten with it,
    ledger-head.json not yet (a crash between the two writes) must still resume."""
    out = tmp_path / "run"
    _crash(_config(tmp_path, seeded=False), out, "aggregated:3")
    priv = out / "privacy.json"
    rec = json.loads(priv.read_text())
    rec["ledger"][-1]["lost"] = True
    priv.write_text(json.dumps(rec))
    res = resume(out, progress=False)
    assert res.rounds_completed == ROUNDS
    assert json.loads(priv.read_text())["rounds_lost"] == 1


def test_a_run_resumed_with_other_noise_describes_each_segment(tmp_path, reference):
    """Issue #18.2: z changed in config.toml on resume; the text names both mechanisms."""
    out = _broken_copy(reference, tmp_path)
    cfg = (out / "config.toml").read_text()
    assert "noise_multiplier = 1.0" in cfg and f"rounds = {ROUNDS}" in cfg
    (out / "config.toml").write_text(cfg.replace("noise_multiplier = 1.0", "noise_multiplier = 2.0")
                                     .replace(f"rounds = {ROUNDS}", f"rounds = {ROUNDS + 2}"))
    resume(out, progress=False)
    priv = json.loads((out / "privacy.json").read_text())
    assert priv["rounds_spent"] == ROUNDS + 2
    text = priv["guarantee"]
    assert f"rounds 1-{ROUNDS}: q=0.1333, z=1, C=1" in text
    assert f"rounds {ROUNDS + 1}-{ROUNDS + 2}: q=0.1333, z=2, C=1" in text
    ledger = Ledger.from_list(priv["ledger"], mode="user")
    assert priv["epsilon"] == epsilon_for(ledger, priv["delta"], "pld")


def test_cli_resume(tmp_path, reference):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--resume", str(reference), "--set", "seed=1"])
    assert res.exit_code == 2 and "--resume: give no CONFIG" in res.output
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a privlm run directory" in res.output
    out = _broken_copy(reference, tmp_path)
    res = runner.invoke(app, ["run", "--resume", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert f"rounds: {ROUNDS}" in res.output


@pytest.mark.parametrize("point", ["aggregated:3", pytest.param("state-written:3", marks=pytest.mark.heavy)])
def test_adaptive_clipping_run_killed_resumes_with_its_clip_norm(tmp_path, point):
    """The adaptive C is part of the resume state: a seeded replay ends bitwise equal."""
    cfg_path = _config(tmp_path, adaptive_clipping=True, clipped_count_stddev=2.0)
    ref = tmp_path / "ref"
    Simulation(load_config(cfg_path, [])).run(ref, progress=False)
    norms = [m["clip_norm"] for m in chaos._final(ref)["metrics"]]
    assert len(set(norms)) > 1  # C really moved
    out = tmp_path / "run"
    _crash(cfg_path, out, point)
    resume(out, progress=False)
    got, want = chaos._final(out), chaos._final(ref)
    for key in want:
        assert got[key] == want[key], f"{key} differs after a crash at {point}"
