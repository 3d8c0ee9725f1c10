"""Banded MF vs DP-FedAvg on Shakespeare at equal epsilon (issue #21).

Same model, rounds, local training and expected cohort for every point; only the mechanism
changes:

* ``fedavg``: DP-FedAvg, Poisson sampling with q = m/N, independent noise;
* ``bandmf``: banded MF, amplified (b-min-separation cyclic Poisson sampling: client i in group
  hash(i) mod b, round t samples group (t-1) mod b, q = b m/N);
* ``bandmf-none``: banded MF with no sampling assumed (m clients check in a round at random; the server
  admits each at most k = ceil(T/b) times, >= b rounds apart: the participation bound a
  cross-device deployment would enforce);
* ``nonprivate``: FedAvg without DP, same cohort.

Resumable: finished points are kept in ``--out/banded_mf_shakespeare.json`` and skipped::

    nohup python benchmarks/banded_mf_shakespeare.py --data ../shared/data/shakespeare \\
        > benchmarks/out/banded_mf_shakespeare.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from privlm.api import Simulation
from privlm.config import load_config

COMMON = ["data.source=shakespeare", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64",
          "client.local_steps=5", "client.batch_size=16", "client.optimizer=adam", "client.lr=0.003",
          "eval.max_clients=400", "privacy.clip_norm=2.0", "output.checkpoint_every=1000"]


def points(epsilons: list[float], bands: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"nonprivate": ["privacy.mode=none"]}
    for eps in epsilons:
        out[f"fedavg eps={eps:g}"] = [f"privacy.target_epsilon={eps}"]
        for sampling, name in (("cyclic-poisson", "bandmf"), ("none", "bandmf-none")):
            out[f"{name} b={bands} eps={eps:g}"] = [
                f"privacy.target_epsilon={eps}", 'privacy.mechanism.kind="banded-mf"',
                f"privacy.mechanism.bands={bands}", f'privacy.mechanism.sampling="{sampling}"']
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="directory of the 37 plays")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients-per-round", type=int, default=60)
    ap.add_argument("--bands", type=int, default=4)
    ap.add_argument("--epsilons", default="2,8")
    ap.add_argument("--only", default=None, help="comma-separated point names to run")
    ap.add_argument("--seeds", default="7", help="comma-separated seeds (model init, sampling, batches)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result_path = args.out / "banded_mf_shakespeare.json"
    done = json.loads(result_path.read_text()) if result_path.exists() else {}
    base = [*COMMON, f'data.path="{args.data}"', f"federation.rounds={args.rounds}",
            f"federation.clients_per_round={args.clients_per_round}", f"eval.every={args.rounds}"]
    todo = points([float(e) for e in args.epsilons.split(",")], args.bands)
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    runs = {(name + (f" seed={seed}" if seed != 7 else "") + (f" T={args.rounds}" if args.rounds != 20 else "")):
            [*extra, f"seed={seed}"] for seed in (int(x) for x in args.seeds.split(",")) for name, extra in todo.items()}
    for name, extra in runs.items():
        if name in done:
            print(f"[{name}] done before: acc {done[name]['eval_accuracy']:.4f}", flush=True)
            continue
        cfg = load_config(None, [*base, *extra])
        run_dir = args.out / "run-banded-mf"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.time()
        sim = Simulation(cfg)
        res = sim.run(run_dir, progress=False)
        priv = json.loads((run_dir / "privacy.json").read_text())
        done[name] = {
            "eval_accuracy": res.eval_accuracy, "eval_loss": res.eval_loss, "epsilon": res.epsilon, "delta": res.delta,
            "noise_multiplier": priv.get("noise_multiplier"), "rounds": res.rounds_completed,
            "clients_per_round": args.clients_per_round, "num_clients": priv["num_clients"],
            "sampling_rate": priv["sampling_rate"], "matrix_factorization": priv.get("matrix_factorization"),
            "clients_summed": sum(m["clients"] for m in res.metrics),
            "refused": sum(m["rejected"] for m in res.metrics), "seconds": round(time.time() - t0, 1),
            "overrides": extra,
        }
        result_path.write_text(json.dumps(done, indent=1))
        print(f"[{name}] acc {res.eval_accuracy:.4f} loss {res.eval_loss:.3f} eps {res.epsilon} "
              f"z {priv.get('noise_multiplier')} ({time.time() - t0:.0f}s)", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
