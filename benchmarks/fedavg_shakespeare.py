"""FedAvg on Shakespeare (by play and role): rounds to 54% next-character accuracy, or one
point of the privacy-utility curve.

McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from Decentralized
Data"), Shakespeare LSTM, FedAvg: 54% test accuracy in 41 rounds at their best setting
(E=5, B=10, C=0.1). Here: privlm's byte-level transformer, 10% of clients per round, held-out
accuracy on every client's last 20% of lines, evaluated every --eval-every rounds.

    python benchmarks/fedavg_shakespeare.py --data ../shared/data/shakespeare --out benchmarks/out

Any config key can be changed with --set (e.g. ``--set device=cuda``, ``--set
privacy.mode=user --set privacy.target_epsilon=8`` for a point of the privacy-utility
curve, ``--target 2`` to run all --max-rounds). The JSON result (``--out/NAME.json``) is
rewritten after every evaluation, so a run cut short still leaves its figures.

``--recipe mcmahan-lstm`` is the paper's own setup (issue #20.A): the character LSTM (embedding 8,
2 x 256), FedAvg E = 5, B = 10, 10% of the clients a round, local SGD lr 1.47, server lr 1, 80-character
windows. Long runs go in the background and continue where they stopped (``--resume``: the run
directory is kept, the round loop resumes from its last durable state, earlier evaluations are
read back from NAME.json):

    nohup python benchmarks/fedavg_shakespeare.py --data ../shared/data/shakespeare --recipe mcmahan-lstm \
        --name lstm_fedavg --eval-every 1 --max-rounds 60 --max-minutes 600 --resume > lstm.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from privlm.config import load_config
from privlm.api import Simulation


RECIPES = {
    "transformer": ["model.n_layer=3", "model.n_embd=128", "model.n_head=4", "model.block_size=80",
                    "client.local_epochs=1", "client.batch_size=10", "client.optimizer=adam", "client.lr=0.003"],
    # McMahan et al. 2017, Shakespeare LSTM, FedAvg E=5, B=10, C=0.1 (their best: 54% in 41 rounds)
    "mcmahan-lstm": ["model.kind=lstm", "model.block_size=80", "client.local_epochs=5", "client.batch_size=10",
                     "client.optimizer=sgd", "client.lr=1.47", "server.lr=1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="directory of the 37 plays")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--name", default="fedavg_shakespeare", help="result file NAME.json under --out")
    ap.add_argument("--target", type=float, default=0.54)
    ap.add_argument("--max-rounds", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=60.0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--keep-run", action="store_true", help="keep the run directory (checkpoints)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--recipe", choices=["transformer", "mcmahan-lstm"], default="transformer")
    ap.add_argument("--resume", action="store_true", help="continue the kept run directory if there is one")
    args = ap.parse_args()
    recipe = RECIPES[args.recipe]

    cfg = load_config(None, [
        "data.source=shakespeare", f'data.path="{args.data}"', "privacy.mode=none",
        *recipe,
        f"federation.rounds={args.max_rounds}", "federation.clients_per_round=123",
        f"eval.every={args.eval_every}", "output.checkpoint_every=1000", *args.overrides,
    ])
    cfg.eval.max_clients = None  # evaluate on every client's held-out lines
    out_dir = args.out / f"run-{args.name}"
    resuming = args.resume and (out_dir / "config.toml").exists()
    t_setup = time.time()
    if resuming:  # the run's own config.toml: the same run, continued
        from privlm.audit import load_plan

        cfg = load_config(out_dir / "config.toml", [])
        sim = Simulation(cfg, audit_plan=load_plan(out_dir))
    else:
        sim = Simulation(cfg)
    stats = sim.corpus.stats()
    print(f"[{args.name}] shakespeare: {stats['num_clients']} clients, {stats['train_chars']:,} train chars; "
          f"model {sim.model.num_params():,} params on {sim.device}; z = {sim.cfg.privacy.noise_multiplier}",
          flush=True)
    t0 = time.time()
    deadline = t0 + args.max_minutes * 60
    reached: dict = {}
    evals: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = args.out / f"{args.name}.json"
    if resuming and earlier.exists():  # the evaluations of earlier sittings; seconds continue from theirs
        before = json.loads(earlier.read_text())
        evals = [e for e in before.get("evals", [])]
        t0 -= before.get("wall_seconds", 0.0)
        if before.get("rounds_to_target"):
            reached.update(round=before["rounds_to_target"], seconds=before["seconds_to_target"])

    def write(rounds_run: int, final: bool) -> dict:
        result = {
            "benchmark": "shakespeare_fedavg", "name": args.name, "final": final,
            "device": str(sim.device), "clients": stats["num_clients"], "train_chars": stats["train_chars"],
            "clients_per_round": cfg.federation.clients_per_round, "params": sim.model.num_params(),
            "privacy_mode": sim.cfg.privacy.mode, "target_epsilon": sim.cfg.privacy.target_epsilon,
            "noise_multiplier": sim.cfg.privacy.noise_multiplier, "delta": sim.cfg.privacy.delta,
            "adaptive_clipping": sim.cfg.privacy.adaptive_clipping, "recipe": args.recipe,
            "pseudo_users": sim.cfg.data.pseudo_users,
            "config": json.loads(sim.cfg.model_dump_json()),
            "overrides": args.overrides,
            "target_accuracy": args.target,
            "rounds_to_target": reached.get("round"),
            "seconds_to_target": reached.get("seconds"),
            "rounds_planned": cfg.federation.rounds,
            "rounds_run": rounds_run,
            "best_accuracy": max(e["eval_accuracy"] for e in evals) if evals else None,
            "final_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "evals": evals,
            "mcmahan_2017_rounds": 41,
            "setup_seconds": t0 - t_setup,
            "wall_seconds": time.time() - t0,
        }
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        return result

    def stop(row: dict) -> bool:
        acc = row.get("eval_accuracy")
        if acc is not None:
            evals.append({"round": row["round"], "eval_accuracy": acc, "eval_loss": row["eval_loss"],
                          "epsilon": row["epsilon"], "clip_norm": row.get("clip_norm"),
                          "seconds": round(time.time() - t0, 1)})
            print(f"[{args.name}] round {row['round']}: eval acc {acc:.4f} loss {row['eval_loss']:.4f} "
                  f"eps {row['epsilon']} ({time.time() - t0:.0f}s)", flush=True)
            if acc >= args.target and not reached:
                reached.update(round=row["round"], accuracy=acc, seconds=time.time() - t0)
            write(row["round"], final=False)
            if reached:
                return True
        return time.time() > deadline

    res = sim.run(out_dir, progress=False, stop_when=stop, resume=resuming)
    done = res.rounds_completed >= cfg.federation.rounds or bool(reached)
    result = write(res.rounds_completed, final=done)
    if done and not args.keep_run and not args.resume:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "evals", "overrides")}, indent=2))


if __name__ == "__main__":
    main()
