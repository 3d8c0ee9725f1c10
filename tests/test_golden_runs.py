"""Behaviour pinned to the bit: seeded runs of fixed configs give the digests recorded in
``tests/golden/digests.json`` (checkpoints, resume state, ledger, privacy.json and metrics
without wall times).

The digests were recorded from the code before the engine refactor (issue #19) and every later
change must reproduce them; a change that is meant to alter results re-records them on purpose:

    PRIVLM_RECORD_GOLDEN=1 python -m pytest tests/test_golden_runs.py

Floating-point results depend on the CPU kernels torch picks, so the digests are keyed by the
torch version, CPU capability and CPU model; on another kind of machine the test records nothing and skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from privlm.config import load_config
from privlm.api import Simulation

GOLDEN = Path(__file__).parent / "golden" / "digests.json"
RECORD = os.environ.get("PRIVLM_RECORD_GOLDEN") == "1"

CLINIC = ["data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=false",
          "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
          "federation.rounds=3", "federation.clients_per_round=6", "client.local_steps=2",
          "client.batch_size=4", "client.lr=0.3", "client.optimizer=sgd", "eval.max_clients=6",
          "privacy.seeded_noise=true", "output.checkpoint_every=2", "seed=11"]

CONFIGS: dict[str, list[str]] = {
    "user-fixed-clip": [*CLINIC, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5"],
    "user-adaptive-clip": [*CLINIC, "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5",
                           "privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=1.0"],
    "user-server-adam": [*CLINIC, "privacy.noise_multiplier=0.8", "server.optimizer=fedadam", "server.lr=0.01"],
    "non-private": [*CLINIC, "privacy.mode=none"],
    "example-level": [*CLINIC, "privacy.mode=example", "data.silos=3", "federation.clients_per_round=3",
                      "privacy.clip_norm=1.0", "privacy.noise_multiplier=1.1",
                      "privacy.example.sampling_rate=0.1", "privacy.example.max_records=2000"],
    "workers-2-processes": [*CLINIC, "privacy.noise_multiplier=0.8", "workers=2", "worker_kind=process"],
    "workers-2-threads": [*CLINIC, "privacy.noise_multiplier=0.8", "workers=2", "worker_kind=thread"],
}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    # (two AVX512 machines, an Intel and an AMD EPYC, gave different digests from the same code)
    return f"torch {torch.__version__} / {torch.backends.cpu.get_cpu_capability()} / {_cpu_model()}"


def run_digest(run_dir: Path) -> dict[str, str]:
    """SHA-256 of what a run released: each checkpoint's bytes, the resume state, the ledger,
    privacy.json and metrics.jsonl (without the ``seconds`` wall time)."""
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    out = {p.name: sha(p.read_bytes()) for p in sorted((run_dir / "checkpoints").glob("*.safetensors"))}
    out["state"] = sha((run_dir / "state.safetensors").read_bytes())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    out["ledger"] = sha(json.dumps(privacy["ledger"], sort_keys=True).encode())
    out["privacy.json"] = sha(json.dumps(privacy, sort_keys=True).encode())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)
    out["metrics"] = sha(json.dumps(rows, sort_keys=True).encode())
    return out


def _check(name: str, digest: dict[str, str]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if RECORD:
        golden.setdefault(machine(), {})[name] = digest
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    if name not in golden.get(machine(), {}):
        pytest.skip(f"no golden digests for {name} on {machine()} (recorded on: {sorted(golden)})")
    assert digest == golden[machine()][name], f"{name}: the run's results changed"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels however many cores the machine has
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seeded_runs_reproduce_their_golden_digests(name, tmp_path):
    Simulation(load_config(None, CONFIGS[name])).run(tmp_path / "run", progress=False)
    _check(name, run_digest(tmp_path / "run"))


def test_a_lora_run_reproduces_its_golden_digest(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_lora import _tiny
    from privlm.data.clinic import example_text
    from privlm.models.tokenizer import train_bpe

    train_bpe([example_text(seed=s) for s in range(30)], 400, tmp_path / "tok")
    model_dir = _tiny("gpt2", tmp_path / "tok", tmp_path / "gpt2")
    cfg = load_config(None, [
        "model.kind=hf", f'model.path="{model_dir}"', "model.max_length=32", "data.num_clients=24",
        "data.scrub.enabled=false", "federation.rounds=2", "federation.clients_per_round=6",
        "client.local_steps=2", "client.batch_size=4", "client.lr=0.01", "privacy.noise_multiplier=1.0",
        "privacy.clip_norm=0.5", "eval.max_clients=4", "output.checkpoint_every=1",
        "privacy.seeded_noise=true", "seed=3"])
    Simulation(cfg).run(tmp_path / "run", progress=False)
    digest = run_digest(tmp_path / "run")
    digest.pop("round-0000.safetensors")  # (the base model's random adapters: covered by round 1)
    _check("lora-gpt2", digest)


def test_a_flower_loopback_run_reproduces_its_golden_digest(shared_data, tmp_path):
    from test_flower import LoopbackGrid, _cfg
    from privlm.runtime.flower.server_app import flower_engine

    flower_engine(_cfg(shared_data), LoopbackGrid(4, 4), 4).run(tmp_path / "run", progress=False)
    _check("flower-loopback", run_digest(tmp_path / "run"))
