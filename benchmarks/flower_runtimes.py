"""One workload on three runtimes, side by side (issue #3).

    python benchmarks/flower_runtimes.py --data ../shared/data --out benchmarks/out [--rounds 3]
        [--workloads tiny cross-device light heavy] [--no-deploy]

Four workloads -- "tiny" (12 clients, 1 local step of 2 windows each: messaging
dominates), "cross-device" (the same client work, 240 clients a round: tiny
Shakespeare's 245 speakers in 240 groups; the per-round costs are shared by more
updates), "light" (12 clients, 1 step of 16 windows) and "heavy" (6 clients, 10 local
steps each: local training dominates) -- each the same DP-FedAvg run (tiny Shakespeare
split into that many clients, the same model, local steps, rounds, seed and seeded noise) on:

* ``in-process``: privlm's simulation (``privlm run``), with ``workers = 1``, with 2
  threads (``workers = 2``) and with 2 processes (``worker_kind = "process"``);
* ``flower-simulation``: Flower's simulation engine, Ray backend
  (``runtime = "flower-simulation"``), one virtual SuperNode per client;
* ``deploy-local``: a real SuperLink and one SuperNode process per client on
  127.0.0.1 (``privlm deploy-local``); not for "tiny" and "cross-device" (its cost is
  process start-up, measured by the light and heavy cases).

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
from privlm.api import Simulation


MINE = ("in-process", "in-process-workers-2", "in-process-processes-2")  # privlm's own runtimes


def workload(data: Path, clients: int, rounds: int, steps: int, batch: int = 16) -> list[str]:
    return [
        "data.source=tinyshakespeare", f'data.path="{data / "tinyshakespeare.txt"}"', f"data.silos={clients}",
        "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64",
        f"client.batch_size={batch}", "client.optimizer=adam", "client.lr=0.003", f"client.local_steps={steps}",
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


def compare(data: Path, tmp: Path, name: str, clients: int, rounds: int, steps: int, batch: int,
            deploy: bool) -> dict:
    """One workload on every runtime; the speed-ups of in-process over each Flower runtime.

    In-process runs three times: one client at a time (``workers = 1``, torch's intra-op
    threads on both cores), two at once in threads (``workers = 2``, one torch thread each)
    and two at once in processes (``worker_kind = "process"``), as Ray runs two ClientApps
    at once on these 2 cores (``flower.client_cpus = 1``).
    """
    overrides = workload(data, clients, rounds, steps, batch)
    no_silos = [o for o in overrides if not o.startswith("data.silos")]  # deploy-local splits by --clients
    threads = torch.get_num_threads()

    def in_process(workers: int, kind: str = "thread"):
        return lambda out: Simulation(load_config(None, [*overrides, f"workers={workers}", f"worker_kind={kind}"])
                                      ).run(out, progress=False)

    runtimes = {
        "in-process": in_process(1),
        "in-process-workers-2": in_process(2),
        "in-process-processes-2": in_process(2, "process"),
        "flower-simulation": lambda out: run_flower_simulation(
            load_config(None, [*overrides, "runtime=flower-simulation"]), out, progress=False),
    }
    if deploy:
        runtimes["deploy-local"] = lambda out: deploy_local(load_config(None, no_silos), clients, out,
                                                            progress=False)
    runs: dict = {}
    for runtime, start in runtimes.items():
        t = time.perf_counter()
        start(tmp / name / runtime)
        torch.set_num_threads(threads)  # workers = 2 lowers it for the process; each run starts equal
        runs[runtime] = summary(runtime, tmp / name / runtime, time.perf_counter() - t)
        print(json.dumps({"workload": name, **runs[runtime]}), flush=True)
    for mine in MINE:
        base = runs[mine]
        for other in runs:
            if other.startswith("in-process"):
                continue
            r = runs[other]
            r[f"max_abs_param_diff_vs_{mine}"] = max_param_diff(tmp / name / mine, tmp / name / other, rounds)
            for how in ("rounds", "steady", "wall"):
                r[f"{mine}_speedup_{how}"] = round(base[f"updates_per_s_{how}"] / r[f"updates_per_s_{how}"], 1)
    return {"clients": clients, "rounds": rounds, "local_steps": steps, "batch_size": batch,
            "overrides": overrides, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", nargs="+", default=["tiny", "cross-device", "light", "heavy"])
    ap.add_argument("--no-deploy", action="store_true", help="leave out deploy-local (minutes per workload)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    # (clients, local steps, batch, deploy-local too?)
    # tiny: one step of 2 windows per client (phones: a few sentences each), 12 a round;
    # cross-device: the same clients' work, 240 a round (Flower's simulation's use case);
    # light: one step of 16 windows (messaging and training both count);
    # heavy: fewer clients with 10 local steps each (local training dominates).
    workloads = {"tiny": (12, 1, 2, False), "cross-device": (240, 1, 2, False), "light": (12, 1, 16, True),
                 "heavy": (6, 10, 16, True)}
    workloads = {k: v for k, v in workloads.items() if k in args.workloads}
    results: dict = {"command": " ".join(sys.argv), "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (clients, steps, batch, deploy) in workloads.items():
            results["workloads"][name] = compare(data, Path(tmp), name, clients, args.rounds, steps, batch,
                                                 deploy and not args.no_deploy)
        results["message_costs"] = message_costs(load_config(None, workload(data, 6, args.rounds, 10)))
        print(json.dumps(results["message_costs"]), flush=True)
    (args.out / "flower_runtimes.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, w in results["workloads"].items():
        for rt, r in w["runs"].items():
            print(f"{name:6s} {rt:18s} {r['updates_per_s_rounds']:8.2f} updates/s (rounds) "
                  f"{r['updates_per_s_wall']:8.2f} updates/s (wall) "
                  f"{r['updates_per_s_steady']:8.2f} updates/s (steady)  loss {r['final_eval_loss']}  "
                  f"eps {r['epsilon']:.4f}  speed-up of in-process (workers 1 / 2 threads / 2 processes): "
                  + " / ".join(f"{r.get(f'{m}_speedup_steady', '-')}x" for m in MINE) + " (steady), "
                  + " / ".join(f"{r.get(f'{m}_speedup_wall', '-')}x" for m in MINE) + " (wall)")


if __name__ == "__main__":
    main()
