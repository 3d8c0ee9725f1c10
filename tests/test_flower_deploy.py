"""``privlm deploy-local``: real Flower SuperLink and SuperNode processes on 127.0.0.1.

Each test starts its own federation on free ports and checks afterwards that not one
Flower process of it is left (every process it started carries FLWR_HOME=<run>/flower/home).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlm.config import load_config
from privlm.errors import FederationError
from privlm.runtime.flower.certs import make_certificates, make_node_key
from privlm.runtime.flower.deploy import deploy_local
from privlm.api import Simulation

pytestmark = pytest.mark.slow

TINY = [
    "data.source=tinyshakespeare",
    "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
    # SGD: Adam's step on a near-zero gradient is sign-like, so it would amplify the last-bit
    # differences that torch's thread count can make between processes.
    "client.batch_size=8", "client.optimizer=sgd", "client.lr=0.5", "client.local_steps=3",
    "federation.rounds=2", "federation.clients_per_round=2",
    "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.5", "privacy.seeded_noise=true",
    "eval.every=100", "seed=11",
]


def _cfg(shared_data, *extra):
    return load_config(None, [*TINY, f'data.path="{shared_data / "tinyshakespeare.txt"}"', *extra])


def _flower_processes(run_dir: Path) -> list[str]:
    """Live processes whose environment names this run's Flower home."""
    marker = f"FLWR_HOME={(run_dir.resolve() / 'flower' / 'home')}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            continue
    return found


def _params(run_dir: Path, r: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"round-{r:04d}.safetensors")


def test_deploy_local_equals_privlm_run_and_leaves_no_process(shared_data, tmp_path):
    """The CI federation: 3 SuperNodes, 2 rounds, against the same run in one process."""
    cfg = _cfg(shared_data)
    ref = Simulation(_cfg(shared_data, "data.silos=3")).run(tmp_path / "sim", progress=False)
    run_dir = deploy_local(cfg, 3, tmp_path / "flower", progress=False)
    assert _flower_processes(run_dir) == []
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref.metrics) == 2
    for a, b in zip(ref.metrics, rows):
        assert (a["sampled"], a["clients"], a["epsilon"]) == (b["sampled"], b["clients"], b["epsilon"])
        assert b["dropped"] == 0 and b["rejected"] == 0
    assert sum(r["sampled"] for r in rows) > 0
    sim_p, fl_p = _params(tmp_path / "sim", 2), _params(run_dir, 2)
    for k in sim_p:
        assert torch.allclose(sim_p[k], fl_p[k], atol=1e-5), k
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert priv["ledger"] == json.loads((tmp_path / "sim" / "privacy.json").read_text())["ledger"]
    assert priv["num_clients"] == 3 and "3 Flower nodes" in priv["population"]
    assert (run_dir / "report.html").exists() and (run_dir / "flower" / "serverapp.log").exists()


@pytest.mark.heavy  # (137 s on 2 cores; the CI-time budget: `python -m pytest -m heavy`)
def test_a_killed_supernode_is_dropped_and_changes_no_epsilon(shared_data, tmp_path):
    """SIGKILL one of 3 SuperNodes after round 1: the run completes, it is counted as dropped."""
    extra = ["federation.rounds=3", "federation.clients_per_round=3", "flower.round_timeout=25"]
    ref = Simulation(_cfg(shared_data, "data.silos=3", *extra)).run(tmp_path / "sim", progress=False)
    killed = {}

    def kill_after_round_one(fed):
        def work():
            metrics = fed.root.parent / "metrics.jsonl"
            while not metrics.exists() or not metrics.read_text().strip():
                time.sleep(0.2)
            proc = fed.procs["supernode-1"]
            os.killpg(proc.pid, signal.SIGKILL)
            killed["at"] = len(metrics.read_text().splitlines())
        threading.Thread(target=work, daemon=True).start()

    run_dir = deploy_local(_cfg(shared_data, *extra), 3, tmp_path / "flower", progress=False,
                           on_started=kill_after_round_one)
    assert killed["at"] == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[0]["dropped"] == 0 and rows[0]["clients"] == 3
    assert all(r["dropped"] == 1 and r["clients"] == 2 for r in rows[1:]), rows
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in ref.metrics]
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert priv["epsilon"] == ref.epsilon and priv["rounds_completed"] == 3
    assert _flower_processes(run_dir) == []


@pytest.mark.heavy  # (75 s on 2 cores; the CI-time budget: `python -m pytest -m heavy`)
def test_tls_and_node_auth_federation_refuses_unknown_nodes(shared_data, tmp_path):
    """TLS with certificates made here, only registered SuperNode keys admitted; two rogue nodes:
    one without the CA (refused by TLS), one with the CA but an unregistered key (refused by auth)."""
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    outcome = {}

    def rogue_nodes(fed):
        no_ca = fed.start_node(7, tls=[])  # neither the CA nor --insecure
        unregistered = fed.start_node(8, auth_key=make_node_key(tmp_path / "rogue-key"))
        for name, proc in (("no_ca", no_ca), ("unregistered", unregistered)):
            try:
                outcome[name] = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                outcome[name] = "still running"
            outcome[name + "_log"] = (fed.root / "logs" / f"supernode-{7 if name == 'no_ca' else 8}.log"
                                      ).read_text(errors="replace")

    run_dir = deploy_local(_cfg(shared_data, "federation.rounds=1"), 2, tmp_path / "tls", certificates=certs,
                           node_auth=True, progress=False, on_started=rogue_nodes)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["dropped"] == 0
    assert json.loads((run_dir / "privacy.json").read_text())["num_clients"] == 2  # no rogue joined
    assert outcome["no_ca"] not in (0, "still running"), outcome
    assert "CERTIFICATE_VERIFY_FAILED" in outcome["no_ca_log"]
    assert "SuperNode ID" not in outcome["unregistered_log"], outcome["unregistered_log"][-2000:]
    home = (run_dir / "flower" / "home" / "config.toml").read_text()
    assert "root-certificates" in home and "insecure" not in home
    assert _flower_processes(run_dir) == []


@pytest.mark.heavy  # (30 s on 2 cores; the CI-time budget: `python -m pytest -m heavy`)
def test_a_failing_run_is_reported_and_stops_every_process(shared_data, tmp_path):
    cfg = load_config(None, [*TINY, "data.source=dir", f'data.path="{tmp_path / "missing"}"',
                             "flower.node_wait=60"])
    with pytest.raises(FederationError, match="ended 'finished:failed'"):
        deploy_local(cfg, 2, tmp_path / "run", progress=False)
    assert "did not load its data" in (tmp_path / "run" / "flower" / "serverapp.log").read_text()
    assert _flower_processes(tmp_path / "run") == []


@pytest.mark.heavy  # (59 s on 2 cores; the CI-time budget: `python -m pytest -m heavy`)
def test_ctrl_c_stops_every_process(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "privlm", "deploy-local", "--clients", "2", "--out", str(run_dir),
            "--no-progress"]
    for item in [*TINY, f'data.path="{shared_data / "tinyshakespeare.txt"}"', "federation.rounds=50"]:
        args += ["--set", item]
    # A shell without job control starts background jobs (a CI runner, say) with SIGINT ignored,
    # and Python keeps an ignored SIGINT ignored: give the child the default, as a terminal would.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _flower_processes(run_dir), "the federation should be up"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a federation running behind a failed test
            proc.terminate()
            proc.wait(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "every Flower process was stopped" in err
    assert _flower_processes(run_dir) == []
    ledger = json.loads((run_dir / "privacy.json").read_text())["ledger"]
    assert len(ledger) >= 1  # what was spent stays on record


@pytest.mark.heavy  # (48 s on 2 cores, Ray's start-up; the CI-time budget: `python -m pytest -m heavy`)
def test_flower_simulation_engine_equals_the_in_process_run(shared_data, tmp_path):
    """runtime = "flower-simulation" (Ray): one virtual SuperNode per client of a user directory."""
    import privlm

    data = tmp_path / "owners"
    data.mkdir()
    lines = (shared_data / "tinyshakespeare.txt").read_text().splitlines()
    for k, name in enumerate(["ana", "ben", "cleo", "dev"]):
        (data / f"{name}.txt").write_text("\n".join(lines[k * 300:(k + 1) * 300]) + "\n")
    extra = [*TINY[1:], "data.source=dir", f'data.path="{data}"', "federation.clients_per_round=3", "eval.every=1"]
    ref = privlm.run(load_config(None, extra), out=tmp_path / "sim", progress=False)
    res = privlm.run(load_config(None, [*extra, "runtime=flower-simulation"]), out=tmp_path / "ray", progress=False)
    assert res.rounds_completed == ref.rounds_completed == 2
    for a, b in zip(ref.metrics, res.metrics):
        assert (a["sampled"], a["clients"], a["epsilon"]) == (b["sampled"], b["clients"], b["epsilon"])
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    sim_p, ray_p = _params(tmp_path / "sim", 2), _params(tmp_path / "ray", 2)
    for k in sim_p:
        assert torch.allclose(sim_p[k], ray_p[k], atol=1e-5), k
    assert "4 Flower nodes" in json.loads((tmp_path / "ray" / "privacy.json").read_text())["population"]
    assert _flower_processes(tmp_path / "ray") == []


@pytest.mark.heavy  # (200 s on 2 loaded cores: `python -m pytest -m heavy`)
def test_a_model_of_300_mb_travels(shared_data, tmp_path):
    """Parameters well over gRPC's classic 4 MB default and common 256 MB proxy limits: Flower
    streams arrays in chunks, so a 300 MB model goes out to both nodes and comes back."""
    owners = tmp_path / "owners"
    owners.mkdir()
    for name in ("ana", "ben"):  # little text: the cost here is the model, not the data
        (owners / f"{name}.txt").write_text("".join(f"line {i} of {name}'s notes\n" for i in range(10)))
    cfg = _cfg(shared_data, "data.source=dir", f'data.path="{owners}"', "model.n_layer=6", "model.n_embd=1024",
               "model.n_head=8", "model.block_size=8", "client.local_steps=1", "client.batch_size=1",
               "federation.rounds=1", "federation.clients_per_round=2", "flower.round_timeout=240")
    run_dir = deploy_local(cfg, 2, tmp_path / "big", progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["clients"] == 2 and rows[0]["dropped"] == 0 and rows[0]["rejected"] == 0
    size = (run_dir / "checkpoints" / "round-0001.safetensors").stat().st_size
    assert size > 300e6, size
    before, after = _params(run_dir, 0), _params(run_dir, 1)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert _flower_processes(run_dir) == []


@pytest.mark.heavy  # (62 s on 2 cores; the CI-time budget: `python -m pytest -m heavy`)
def test_kill_9_of_deploy_local_leaves_no_flower_process(shared_data, tmp_path):
    """Issue #26.6: SIGKILL gives privlm no chance to clean up; its children must die with it."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "privlm", "deploy-local", "--clients", "2", "--out", str(run_dir),
            "--no-progress"]
    for item in [*TINY, f'data.path="{shared_data / "tinyshakespeare.txt"}"', "federation.rounds=50"]:
        args += ["--set", item]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _flower_processes(run_dir), "the federation should be up"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # the kernel's SIGKILL, then their own children's exits
        while _flower_processes(run_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _flower_processes(run_dir) == []
    finally:
        for line in _flower_processes(run_dir):  # never leave a federation behind a failed test
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
