"""Non-private FedAvg on Shakespeare (by play and role): rounds to 54% next-character accuracy.

McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from Decentralized
Data"), Shakespeare LSTM, FedAvg: 54% test accuracy in 41 rounds at their best setting
(E=5, B=10, C=0.1). Here: privlm's byte-level transformer, 10% of clients per round, held-out
accuracy on every client's last 20% of lines, evaluated every --eval-every rounds.

    python benchmarks/fedavg_shakespeare.py --data ../shared/data/shakespeare --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from privlm.config import load_config
from privlm.runtime.simulation import Simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="directory of the 37 plays")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--target", type=float, default=0.54)
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=60.0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    cfg = load_config(None, [
        "data.source=shakespeare", f'data.path="{args.data}"', "privacy.mode=none",
        "model.n_layer=3", "model.n_embd=128", "model.n_head=4", "model.block_size=80",
        "client.local_epochs=1", "client.batch_size=10", "client.optimizer=adam", "client.lr=0.003",
        f"federation.rounds={args.max_rounds}", "federation.clients_per_round=123",
        f"eval.every={args.eval_every}", "output.checkpoint_every=1000", *args.overrides,
    ])
    cfg.eval.max_clients = None  # evaluate on every client's held-out lines
    sim = Simulation(cfg)
    stats = sim.corpus.stats()
    print(f"shakespeare: {stats['num_clients']} clients, {stats['train_chars']:,} train chars; "
          f"model {sim.model.num_params():,} params")
    t0 = time.time()
    deadline = t0 + args.max_minutes * 60
    reached = {}

    def stop(row: dict) -> bool:
        acc = row.get("eval_accuracy")
        if acc is not None:
            print(f"round {row['round']}: eval acc {acc:.4f} loss {row['eval_loss']:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if acc >= args.target and not reached:
                reached.update(round=row["round"], accuracy=acc, seconds=time.time() - t0)
                return True
        return time.time() > deadline

    out_dir = args.out / f"shakespeare-fedavg-{time.strftime('%Y%m%d-%H%M%S')}"
    res = sim.run(out_dir, progress=False, stop_when=stop)
    evals = [(m["round"], m["eval_accuracy"]) for m in res.metrics if m["eval_accuracy"] is not None]
    result = {
        "benchmark": "shakespeare_fedavg_nonprivate",
        "clients": stats["num_clients"], "train_chars": stats["train_chars"],
        "clients_per_round": cfg.federation.clients_per_round, "params": sim.model.num_params(),
        "config": json.loads(cfg.model_dump_json()),
        "target_accuracy": args.target,
        "rounds_to_target": reached.get("round"),
        "seconds_to_target": reached.get("seconds"),
        "rounds_run": res.rounds_completed,
        "best_accuracy": max(a for _, a in evals) if evals else None,
        "accuracy_by_round": evals,
        "mcmahan_2017_rounds": 41,
        "wall_seconds": time.time() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fedavg_shakespeare.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "accuracy_by_round")}, indent=2))


if __name__ == "__main__":
    main()
