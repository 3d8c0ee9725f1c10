"""Hostile input through the real CLI (issue #26): one line on stderr, exit 2, no traceback,
no local variable, and nothing created or changed on disk by a command that fails.

Each case runs ``python -m privlm`` in a subprocess, as a user would, from a scratch
directory holding a small finished run (``run``) and whatever the case plants.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from privlm.config import load_config
from privlm.api import Simulation

TINY = ["data.num_clients=30", "federation.clients_per_round=5", "federation.rounds=2",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
        "client.local_steps=1", "eval.max_clients=4", "privacy.noise_multiplier=1.0",
        "privacy.seeded_noise=true", "data.scrub.enabled=false", "privacy.delta=1e-5"]
SETS = [a for kv in TINY for a in ("--set", kv)]
NO_Z = [a for kv in TINY if "noise_multiplier" not in kv for a in ("--set", kv)]  # calibrate z instead
EPS = ["epsilon", "--sampling-rate", "0.01", "--rounds", "10", "--delta", "1e-5"]


def _ledger(tmp: Path, content: str) -> list[str]:
    (tmp / "priv.json").write_text(content)
    return ["epsilon", "--ledger", "priv.json"]


def _entry(q=0.1, z=1.0) -> dict:
    return {"round": 1, "event": {"class": "PoissonSampledDpEvent", "sampling_probability": q,
                                  "event": {"class": "GaussianDpEvent", "noise_multiplier": z}}}


def _plant_plan(tmp: Path) -> None:
    """A valid canary plan from elsewhere, in a run that planted none."""
    from privlm.audit import draw_plan, save_plan

    save_plan(tmp / "run", draw_plan([f"c{i}" for i in range(30)], 4, "my number is {secret}", 6, 1, 0.1, 0))


def _set_runtime(tmp: Path, runtime: str) -> None:
    """privacy.json of a run made on another runtime (deploy-local writes "flower")."""
    path = tmp / "run" / "privacy.json"
    rec = json.loads(path.read_text())
    rec["runtime"] = runtime
    path.write_text(json.dumps(rec))


def _rename_checkpoints(tmp: Path, name: str) -> None:
    for p in (tmp / "run" / "checkpoints").glob("round-*.safetensors"):
        p.unlink()
    (tmp / "run" / "checkpoints" / name).write_bytes(b"not a checkpoint")


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _nan_checkpoint(tmp: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = sorted((tmp / "run" / "checkpoints").glob("round-*.safetensors"))[-1]
    tensors = load_file(ckpt)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, ckpt, metadata={"round": "2"})


def _data_with_link(tmp: Path, target: str) -> list[str]:
    d = tmp / "owners"
    d.mkdir()
    for i in range(3):
        (d / f"user{i}.txt").write_text("some text of a user\n" * 20)
    (d / "evil.txt").symlink_to(target)
    return ["run", *SETS, "--set", "data.source=dir", "--set", "data.path=owners",
            "--set", "federation.clients_per_round=2", "--out", "new-run"]


# (id, setup(tmp) -> argv, what the one line must name)
CASES = [
    # privacy numbers the accountant cannot handle
    ("eps-z-huge", lambda t: [*EPS, "--noise-multiplier", "1e308"], "--noise-multiplier"),
    ("eps-z-tiny", lambda t: [*EPS, "--noise-multiplier", "1e-300"], "--noise-multiplier"),
    ("eps-z-1e-4", lambda t: [*EPS, "--noise-multiplier", "1e-4"], "--noise-multiplier"),
    ("eps-z-nan", lambda t: [*EPS, "--noise-multiplier", "nan"], "--noise-multiplier"),
    ("eps-z-inf", lambda t: [*EPS, "--noise-multiplier", "inf"], "--noise-multiplier"),
    ("eps-rounds-2^31", lambda t: ["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1",
                                   "--rounds", "2147483647", "--delta", "1e-5"], "--rounds"),
    ("eps-delta-nan", lambda t: ["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1",
                                 "--rounds", "10", "--delta", "nan"], "--delta"),
    ("eps-q-nan", lambda t: ["epsilon", "--sampling-rate", "nan", "--noise-multiplier", "1",
                             "--rounds", "10", "--delta", "1e-5"], "--sampling-rate"),
    ("calibrate-unattainable", lambda t: ["calibrate", "--target-epsilon", "1e-6", "--sampling-rate", "0.5",
                                          "--rounds", "100", "--delta", "1e-5"], "--target-epsilon"),
    ("calibrate-nan", lambda t: ["calibrate", "--target-epsilon", "nan", "--sampling-rate", "0.5",
                                 "--rounds", "100", "--delta", "1e-5"], "--target-epsilon"),
    # config values
    ("cfg-z-huge", lambda t: ["run", *SETS, "--set", "privacy.noise_multiplier=1e308", "--out", "new-run"],
     "privacy.noise_multiplier"),
    ("cfg-z-tiny", lambda t: ["run", *SETS, "--set", "privacy.noise_multiplier=1e-300", "--out", "new-run"],
     "privacy.noise_multiplier"),
    ("cfg-target-nan", lambda t: ["run", *NO_Z, "--set", "privacy.target_epsilon=nan", "--out", "new-run"],
     "privacy.target_epsilon"),
    ("cfg-target-unattainable", lambda t: ["run", *NO_Z, "--set", "privacy.target_epsilon=1e-6", "--out", "new-run"],
     "privacy.target_epsilon"),
    ("cfg-block-size", lambda t: ["run", *SETS, "--set", "model.block_size=100000000", "--out", "new-run"],
     "model.block_size"),
    ("cfg-clip-huge", lambda t: ["run", *SETS, "--set", "privacy.clip_norm=1e308", "--out", "new-run"],
     "privacy.clip_norm"),
    ("cfg-clip-lr", lambda t: ["run", *SETS, "--set", "privacy.adaptive_clipping=true", "--set",
                               "privacy.clip_learning_rate=1e6", "--out", "new-run"], "privacy.clip_learning_rate"),
    ("cfg-seeded-yes", lambda t: ["run", *SETS, "--set", "privacy.seeded_noise=yes", "--out", "new-run"],
     "privacy.seeded_noise"),
    ("cfg-rounds-2^31", lambda t: ["run", *SETS, "--set", "federation.rounds=2147483647", "--out", "new-run"],
     "federation.rounds"),
    # ledgers and run-directory files
    ("ledger-dev-zero", lambda t: ["epsilon", "--ledger", "/dev/zero"], "/dev/zero"),
    ("ledger-list", lambda t: _ledger(t, "[1, 2]"), "priv.json"),
    ("ledger-string", lambda t: _ledger(t, '"hello"'), "priv.json"),
    ("ledger-nan-z", lambda t: _ledger(t, json.dumps({"mode": "user", "delta": 1e-5, "ledger": [
        _entry(z=float("nan"))]})), "priv.json"),
    ("ledger-negative-q", lambda t: _ledger(t, json.dumps({"mode": "user", "delta": 1e-5,
                                                           "ledger": [_entry(q=-0.5)]})), "priv.json"),
    ("ledger-string-delta", lambda t: _ledger(t, json.dumps({"mode": "user", "delta": "tiny",
                                                             "ledger": [_entry()]})), "priv.json"),
    ("ledger-deep", lambda t: _ledger(t, "[" * 100_000 + "]" * 100_000), "priv.json"),
    ("metrics-scalar", lambda t: ((t / "run" / "metrics.jsonl").write_text("42\n"),
                                  ["run", "--resume", "run", "--no-progress"])[1], "metrics.jsonl"),
    ("resume-foreign-scrub", lambda t: ((t / "run" / "scrub.json").write_text('{"counts": {"PERSON": 3}}'),
                                        ["run", "--resume", "run", "--no-progress"])[1], "scrub.json"),
    ("resume-foreign-plan", lambda t: (_plant_plan(t), ["run", "--resume", "run", "--no-progress"])[1],
     "canaries.json"),
    ("resume-a-flower-run", lambda t: (_set_runtime(t, "flower"), ["run", "--resume", "run", "--no-progress"])[1],
     "flower runtime"),
    # checkpoints
    ("ckpt-name-final", lambda t: (_rename_checkpoints(t, "round-final.safetensors"), ["eval", "run"])[1],
     "checkpoints"),
    ("ckpt-name-bak", lambda t: (_rename_checkpoints(t, "round-0002.bak"), ["generate", "run"])[1], "checkpoints"),
    ("ckpt-flipped-byte", lambda t: (_flip_last_byte(sorted((t / "run" / "checkpoints").glob("round-*"))[-1]),
                                     ["eval", "run"])[1], "SHA-256"),
    ("ckpt-nan-generate", lambda t: (_nan_checkpoint(t), ["generate", "run", "--prompt", "a"])[1], "round-0002"),
    # generation options
    ("gen-seed-2^63", lambda t: ["generate", "run", "--seed", str(2**63)], "--seed"),
    ("gen-temperature-nan", lambda t: ["generate", "run", "--temperature", "nan"], "--temperature"),
    # audit
    ("audit-bad-plan", lambda t: ((t / "run" / "audit").mkdir(), (t / "run" / "audit" / "canaries.json")
                                  .write_text("[1]"), ["audit", "run"])[2], "canaries.json"),
    # output paths
    ("out-dev-null", lambda t: ["run", *SETS, "--out", "/dev/null/x"], "/dev/null/x"),
    ("out-a-file", lambda t: ((t / "afile").write_text("mine\n"), ["run", *SETS, "--out", "afile"])[1], "afile"),
    ("out-not-empty", lambda t: ((t / "mine").mkdir(), (t / "mine" / "config.toml").write_text("# mine\n"),
                                 ["run", *SETS, "--out", "mine"])[2], "mine"),
    # data folders
    ("data-link-passwd", lambda t: _data_with_link(t, "/etc/passwd"), "evil.txt"),
    ("data-link-environ", lambda t: _data_with_link(t, "/proc/self/environ"), "evil.txt"),
    # keys
    ("node-key-pub", lambda t: ["node-key", "k.pub"], "k.pub"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """Every case, each in its own copy of a small finished run, 3 processes at a time:
    ``{case: (process, snapshot before, snapshot after)}``."""
    base = tmp_path_factory.mktemp("hostile")
    Simulation(load_config(None, TINY)).run(base / "finished", progress=False)
    prepared = {}
    for name, setup, _ in CASES:
        d = base / name
        shutil.copytree(base / "finished", d / "run")
        prepared[name] = (d, setup(d))

    def attack(name: str):
        d, argv = prepared[name]
        before = _snapshot(d)
        proc = subprocess.run([sys.executable, "-m", "privlm", *argv], cwd=d, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "COLUMNS": "400"})
        return name, (proc, before, _snapshot(d))

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(attack, prepared))


def _snapshot(root: Path) -> dict[str, str]:
    found = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name == ".lock":  # a live run's lock: it holds the pid of whoever took it last
            continue
        if p.is_symlink():
            found[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            found[rel] = "dir"
    return found


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_one_line_and_changes_nothing(case, outcomes):
    name, _, names = case
    proc, before, after = outcomes[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "locals" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and names in lines[0], lines[0]
    assert after == before, f"{name}: a failed command changed the directory"


def test_an_unexpected_error_prints_one_line_and_no_local_variable(monkeypatch, capsys):
    """Issue #26.1: typer's pretty tracebacks printed every frame's locals (clients' text)."""
    import privlm.inference
    from privlm import cli

    def leaky(run_dir):
        patient = "Jane Roe, born 1961-04-02, MRN 5550100"  # a local a traceback would show
        raise RuntimeError(f"failed on {len(patient)} characters")

    monkeypatch.setattr(privlm.inference, "evaluate_run", leaky)
    monkeypatch.setattr(sys, "argv", ["privlm", "eval", "somewhere"])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    out = capsys.readouterr()
    assert exit_.value.code == 2
    lines = [line for line in (out.err + out.out).splitlines() if line.strip()]
    assert len(lines) == 1 and "unexpected RuntimeError" in lines[0], lines
    assert "Jane" not in out.err + out.out and "Traceback" not in out.err


def test_a_non_finite_global_model_stops_the_run_and_is_never_saved(monkeypatch, tmp_path):
    """Issue #26.2: a NaN model was released with exit 0 and a guarantee."""
    from privlm.errors import DataError
    from privlm.federated import dp_fedavg

    real_apply = dp_fedavg.apply

    def poisoned(algo, state, contributions, noise):
        new, stats = real_apply(algo, state, contributions, noise)
        if new.round == 2:
            name = next(iter(new.params))
            new.params[name] = new.params[name] * float("nan")
        return new, stats

    monkeypatch.setattr(dp_fedavg, "apply", poisoned)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="round 2: the global model became non-finite"):
        Simulation(load_config(None, [*TINY, "output.checkpoint_every=1"])).run(out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == [
        "round-0000.safetensors", "round-0001.safetensors"]
    ledger = json.loads((out / "privacy.json").read_text())["ledger"]
    assert [e["round"] for e in ledger] == [1, 2]  # round 2 stays paid
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_resume_state_with_nan_values_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from privlm.errors import DataError
    from privlm.api import resume

    out = tmp_path / "run"
    Simulation(load_config(None, TINY)).run(out, progress=False)
    state = out / "state.safetensors"
    from safetensors import safe_open

    with safe_open(state, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(state)
    key = next(k for k in tensors if k.startswith("params/"))
    tensors[key] = tensors[key] * float("inf")
    from privlm.rundir import tensors_digest

    info = json.loads(meta["state"])  # a consistent file (as a buggy writer would make), holding Inf
    info["tensors_sha256"] = tensors_digest(tensors)
    save_file(tensors, state, metadata={"state": json.dumps(info)})
    with pytest.raises(DataError, match="holds NaN or Inf"):
        resume(out, progress=False)


def test_resume_removes_only_its_own_temp_files(tmp_path):
    """Issue #26.8: resume deleted the user's own hidden .tmp files."""
    from privlm.rundir import RunDir

    rd = RunDir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    ours = [tmp_path / ".privacy.json.ab12cd.tmp", tmp_path / "checkpoints" / ".round-0003.safetensors.x1.tmp"]
    theirs = [tmp_path / ".notes.tmp", tmp_path / ".my.draft.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    assert sorted(rd.remove_partial_writes()) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (root only; skipped where mounting is not allowed), unmounted after."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to fill a disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_loses_nothing(small_disk, tmp_path):
    """ENOSPC mid-run: one line, exit 2; ledger, head, state and checkpoints stay loadable; once
    there is space again, --resume finishes the run."""
    from safetensors.torch import load_file

    from privlm.privacy import Ledger
    from privlm.rundir import RunDir

    rounds = 40
    out = small_disk / "run"
    argv = [sys.executable, "-m", "privlm", "run", *SETS, "--set", f"federation.rounds={rounds}",
            "--set", "output.checkpoint_every=1", "--out", str(out), "--no-progress"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "seeded_noise" not in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "--resume" in lines[0], lines
    rd = RunDir(out)
    rec = rd.read_privacy()
    ledger = Ledger.from_list(rec["ledger"], mode="user")
    entries, digest = rd.read_head()
    assert ledger.digest(entries) == digest
    done, *_ = rd.load_state()
    assert 0 < done < rounds and len(ledger) >= done
    for r in rd.checkpoints():
        load_file(rd.checkpoint_path(r))  # every checkpoint on disk is whole
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = subprocess.run([sys.executable, "-m", "privlm", "run", "--resume", str(out), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert rd.read_privacy()["rounds_completed"] == rounds


def test_flipped_bytes_in_the_resume_state_are_refused(tmp_path):
    """Issue #26.8: damaged tensor bytes in state.safetensors resumed silently."""
    from privlm.errors import DataError
    from privlm.api import resume

    out = tmp_path / "run"
    Simulation(load_config(None, TINY)).run(out, progress=False)
    state = out / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0x10  # a bit of the last tensor's data, not the header
    state.write_bytes(bytes(data))
    with pytest.raises(DataError, match="do not match their SHA-256"):
        resume(out, progress=False)


def test_a_read_only_output_is_one_line_and_writes_nothing(small_disk, tmp_path):
    """EROFS: the run cannot even create its directory; one line, exit 2."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc = subprocess.run([sys.executable, "-m", "privlm", "run", *SETS, "--out", str(small_disk / "run"),
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "Read-only file system" in lines[0] and "Traceback" not in proc.stderr
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_at_every_write_point_loses_nothing_and_resumes_to_the_same_run(tmp_path, monkeypatch):
    """ENOSPC injected half-way through the n-th atomic write, for every n of a 2-round run: the run
    stops with OSError, nothing on disk is half-written or inconsistent, and a resume gives the
    uninterrupted run's ledger and final checkpoint byte for byte (seeded, so replayable)."""
    import errno

    from privlm import faults
    from privlm.api import resume
    from privlm.errors import DataError
    from privlm.privacy import Ledger
    from privlm.rundir import RunDir

    cfg = load_config(None, [*TINY, "output.checkpoint_every=1"])
    Simulation(cfg).run(tmp_path / "ref", progress=False)
    ref_ledger = json.loads((tmp_path / "ref" / "privacy.json").read_text())["ledger"]
    ref_final = (tmp_path / "ref" / "checkpoints" / "round-0002.safetensors").read_bytes()
    points = 0
    for n in range(1, 80):
        out = tmp_path / f"run-{n}"
        faults._counts.clear()
        monkeypatch.setenv("PRIVLM_ENOSPC_AT", str(n))
        try:
            Simulation(load_config(None, [*TINY, "output.checkpoint_every=1"])).run(out, progress=False)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        else:
            break  # n is past the run's last write: every write point was tried
        finally:
            monkeypatch.delenv("PRIVLM_ENOSPC_AT")
        points += 1
        assert not [p for p in out.rglob("*.tmp")], n  # the half-written file was removed
        rd = RunDir(out)
        if rd.privacy_path.exists() and rd.head_path.exists():
            entries, digest = rd.read_head()
            assert Ledger.from_list(rd.read_privacy()["ledger"], mode="user").digest(entries) == digest, n
        if rd.config_path.exists():
            resume(out, progress=False)
        else:  # the very first write: nothing to resume (said in one line); the same directory runs anew
            with pytest.raises(DataError, match="not a privlm run directory"):
                resume(out, progress=False)
            Simulation(load_config(None, [*TINY, "output.checkpoint_every=1"])).run(out, progress=False)
        assert json.loads(rd.privacy_path.read_text())["ledger"] == ref_ledger, n
        assert rd.checkpoint_path(2).read_bytes() == ref_final, n
    assert points >= 15, points  # config, privacy, head, checkpoints, state, metrics, report: all tried


def test_resume_refuses_an_audit_json_that_is_not_an_audit_of_this_run(tmp_path):
    """Issue #26 (left over): a foreign audit.json in the run directory was kept by a resume (and
    shown in report.html as this run's audit). An audit of one of the run's checkpoints is kept."""
    from privlm.api import resume
    from privlm.errors import DataError

    out = tmp_path / "run"
    Simulation(load_config(None, [*TINY, "output.checkpoint_every=1"])).run(out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for foreign in ('{"round": 99}', '{"round": "1"}', '[1, 2]', '{"no": "round"}'):
        (out / "audit.json").write_text(foreign)
        with pytest.raises(DataError, match="audit.json: not an audit of a checkpoint of this run"):
            resume(out, progress=False)
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "audit.json"}
        assert after == {k: v for k, v in before.items() if k != "audit.json"}  # nothing changed
    (out / "audit.json").write_text('{"round": 1, "claimed_epsilon": 3.0}')  # an audit of checkpoint 1
    assert resume(out, progress=False).rounds_completed == 2
