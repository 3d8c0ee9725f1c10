"""One workload on three runtimes, side by side (issue #3).

    python benchmarks/flower_runtimes.py --data ../shared/data --out benchmarks/out [--rounds 3]

Two workloads -- "light" (12 clients, 1 local step each: cross-device, messaging
dominates) and "heavy" (6 clients, 10 local steps each: local training
dominates) -- each the same DP-FedAvg run (tiny Shakespeare split into that many
clients, the same model, local steps, rounds, seed and seeded noise) on:

* ``in-process``: privlm's simulation (``privlm run``);
* ``flower-simulation``: Flower's simulation engine, Ray backend
  (``runtime = "flower-simulation"``), one virtual SuperNode per client;
* ``deploy-local``: a real SuperLink and one SuperNode process per client on
  127.0.0.1 (``privlm deploy-local``).

Every client is sampled every round (q = 1), so each run does the same
``clients x rounds`` client updates. Throughput is client updates per second
of the rounds (from ``metrics.jsonl``) and of the whole command (start-up and
shut-down included). "Equal results" is checked: the final parameters of the
Flower runs must match the in-process run's.

It also times where a Flower message's cost goes: starting a ClientApp process
(Python + torch + privlm imports, paid per message in deployment), encoding
and decoding the parameters, and the local training itself.

Prints one JSON object per measurement and writes ``flower_runtimes.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from privlm.config import load_config
from privlm.federated.client import LocalTraining, get_params, local_train
from privlm.runtime.flower import codec
from privlm.runtime.flower.deploy import deploy_local
from privlm.runtime.flower.ray_simulation import run_flower_simulation
from privlm.runtime.simulation import Simulation


def workload(data: Path, clients: int, rounds: int, steps: int) -> list[str]:
    return [
        "data.source=tinyshakespeare", f'data.path="{data / "tinyshakespeare.txt"}"', f"data.silos={clients}",
        "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64",
        "client.batch_size=16", "client.optimizer=adam", "client.lr=0.003", f"client.local_steps={steps}",
        f"federation.rounds={rounds}", f"federation.clients_per_round={clients}",
        "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5", "privacy.target_epsilon=100",
        "privacy.seeded_noise=true",
        f"eval.every={rounds}", "eval.max_clients=1", "output.checkpoint_every=1000", "seed=3",
    ]


def summary(name: str, run_dir: Path, wall: float) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = sum(r["clients"] for r in rows)
    round_seconds = sum(r["seconds"] for r in rows)
    # Steady state: rounds 2.. (round 1 pays one-time costs: imports, Ray actors warming up).
    steady = rows[1:]
    return {
        "updates_per_s_steady": round(sum(r["clients"] for r in steady) / sum(r["seconds"] for r in steady), 3),
        "runtime": name, "rounds": len(rows), "client_updates": updates,
        "round_seconds": round(round_seconds, 2), "wall_seconds": round(wall, 2),
        "updates_per_s_rounds": round(updates / round_seconds, 3),
        "updates_per_s_wall": round(updates / wall, 3),
        "final_eval_loss": rows[-1]["eval_loss"], "epsilon": rows[-1]["epsilon"],
        "dropped": sum(r.get("dropped", 0) for r in rows),
    }


def max_param_diff(a: Path, b: Path, rounds: int) -> float:
    pa = load_file(a / "checkpoints" / f"round-{rounds:04d}.safetensors")
    pb = load_file(b / "checkpoints" / f"round-{rounds:04d}.safetensors")
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


def message_costs(cfg) -> dict:
    """What one train message costs besides the training: process start, codec."""
    starts, optim = [], []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import privlm.runtime.flower.client_app"], check=True)
        starts.append(time.perf_counter() - t)
        # torch.optim's first optimizer imports torch._dynamo: paid once per process
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch; torch.optim.Adam([torch.zeros(1, requires_grad=True)])"],
                       check=True)
        with_optim = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        optim.append(with_optim - (time.perf_counter() - t))
    sim = Simulation(cfg)
    params = get_params(sim.model)
    t = time.perf_counter()
    for _ in range(20):
        rec = codec.to_record(params)
        codec.from_record(rec, params)
    codec_s = (time.perf_counter() - t) / 20
    c = sim.cfg.client
    local = LocalTraining(c.local_epochs, c.local_steps, c.batch_size, c.lr, c.optimizer)
    t = time.perf_counter()
    for i in range(len(sim.train_tokens)):
        local_train(sim.model, params, sim.train_tokens[i], local, torch.Generator().manual_seed(i))
    train_s = (time.perf_counter() - t) / len(sim.train_tokens)
    return {"clientapp_process_start_s": round(statistics.median(starts), 3),
            "first_torch_optimizer_s": round(statistics.median(optim), 3),
            "encode_decode_params_s": round(codec_s, 5),
            "param_bytes": sum(v.numel() * v.element_size() for v in params.values()),
            "local_training_s": round(train_s, 3),
            "supernode_poll_interval_s": 3.0}


def compare(data: Path, tmp: Path, name: str, clients: int, rounds: int, steps: int) -> dict:
    """One workload on the three runtimes; the speed-ups of in-process over each Flower runtime."""
    overrides = workload(data, clients, rounds, steps)
    no_silos = [o for o in overrides if not o.startswith("data.silos")]  # deploy-local splits by --clients
    runtimes = {
        "in-process": lambda out: Simulation(load_config(None, overrides)).run(out, progress=False),
        "flower-simulation": lambda out: run_flower_simulation(
            load_config(None, [*overrides, "runtime=flower-simulation"]), out, progress=False),
        "deploy-local": lambda out: deploy_local(load_config(None, no_silos), clients, out, progress=False),
    }
    runs: dict = {}
    for runtime, start in runtimes.items():
        t = time.perf_counter()
        start(tmp / name / runtime)
        runs[runtime] = summary(runtime, tmp / name / runtime, time.perf_counter() - t)
        print(json.dumps({"workload": name, **runs[runtime]}), flush=True)
    base = runs["in-process"]
    for other in ("flower-simulation", "deploy-local"):
        r = runs[other]
        r["max_abs_param_diff_vs_in_process"] = max_param_diff(tmp / name / "in-process", tmp / name / other, rounds)
        for how in ("rounds", "steady", "wall"):
            r[f"in_process_speedup_{how}"] = round(base[f"updates_per_s_{how}"] / r[f"updates_per_s_{how}"], 1)
    return {"clients": clients, "rounds": rounds, "local_steps": steps, "overrides": overrides, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    # light: cross-device, little local work per client (messaging dominates);
    # heavy: fewer clients with 10 local steps each (local training dominates).
    workloads = {"light": (12, 1), "heavy": (6, 10)}
    results: dict = {"command": " ".join(sys.argv), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (clients, steps) in workloads.items():
            results["workloads"][name] = compare(data, Path(tmp), name, clients, args.rounds, steps)
        results["message_costs"] = message_costs(load_config(None, workload(data, 6, args.rounds, 10)))
        print(json.dumps(results["message_costs"]), flush=True)
    (args.out / "flower_runtimes.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, w in results["workloads"].items():
        for rt, r in w["runs"].items():
            print(f"{name:6s} {rt:18s} {r['updates_per_s_rounds']:8.2f} updates/s (rounds) "
                  f"{r['updates_per_s_wall']:8.2f} updates/s (wall) "
                  f"{r['updates_per_s_steady']:8.2f} updates/s (steady)  loss {r['final_eval_loss']}  "
                  f"eps {r['epsilon']:.4f}  speed-up of in-process {r.get('in_process_speedup_rounds', '-')}x "
                  f"(rounds) {r.get('in_process_speedup_steady', '-')}x (steady) "
                  f"{r.get('in_process_speedup_wall', '-')}x (wall)")


if __name__ == "__main__":
    main()
