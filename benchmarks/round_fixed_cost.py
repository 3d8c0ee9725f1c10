"""The per-round fixed cost of the round engine (issue #19): everything a round does except
local training and the per-update clip-and-sum.

Local training is replaced by a stub that hands back a precomputed update at once (every
module's ``local_train`` is patched, wherever it was imported), so a round's time is the
engine's own work (budget check, ledger write, sampling, validation, clip and sum, noise,
server step, metrics, resume state, privacy.json) plus the clip-and-sum of its updates, which
is measured alone on the same updates and subtracted. Each round's time is taken between
consecutive ``stop_when`` calls (one per completed round), median over the rounds after the
first; the two cohort sizes alternate, A/B, ``--reps`` times.

    python benchmarks/round_fixed_cost.py --out benchmarks/out --label after

``--compare REF`` measures this tree against git revision REF side by side: each measurement
is a fresh process (``PYTHONPATH`` = that tree's ``src``), alternating REF / this tree.

    python benchmarks/round_fixed_cost.py --compare e723fae --reps 4 --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import privlm.federated.client as client_mod
from privlm.config import load_config
from privlm.federated.aggregation import RunningSum
try:
    from privlm.api import Simulation
except ImportError:  # the code before the engine refactor (issue #19)
    from privlm.runtime.simulation import Simulation  # type: ignore[no-redef]

POPULATION = 2400


def _stub_training(update: dict[str, torch.Tensor]):
    result = client_mod.ClientResult(update=update, num_tokens=100, loss_sum=2.0, steps=1)
    real = client_mod.local_train

    def local_train(*args, **kwargs):
        return result

    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "local_train", None) is real:
            mod.local_train = local_train
            patched.append(mod)
    return lambda: [setattr(m, "local_train", real) for m in patched]


def one_run(cohort: int, rounds: int) -> dict:
    cfg = load_config(None, [
        "data.source=synthetic-clinic", f"data.num_clients={POPULATION}", "data.scrub.enabled=false",
        f"federation.clients_per_round={cohort}", f"federation.rounds={rounds}",
        "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0", f"eval.every={rounds + 1}",
        "eval.max_clients=1", "output.checkpoint_every=10"])
    sim = Simulation(cfg)
    params = {n: p.detach().clone() for n, p in sim.model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    update = {k: torch.randn(v.shape, generator=gen) * 0.01 for k, v in params.items()}
    restore = _stub_training(update)
    stamps: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stamps.append(time.perf_counter())
            result = sim.run(Path(tmp) / "run", progress=False,
                             stop_when=lambda row: stamps.append(time.perf_counter()) and False)
    finally:
        restore()
    per_round = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    sampled = [m["sampled"] for m in result.metrics][1:]
    # The clip-and-sum of the same updates, alone (the part that grows with the cohort).
    k = round(statistics.mean(sampled))
    t = time.perf_counter()
    rs = RunningSum.zeros_like(params, 1.0)
    for _ in range(k):
        rs.add(update)
    clip_sum = time.perf_counter() - t
    return {"round_s": statistics.median(per_round), "clip_sum_s": clip_sum, "mean_sampled": k,
            "model_params": sum(v.numel() for v in params.values())}


def compare(ref: str, reps: int, rounds: int, out: Path) -> None:
    """REF vs this tree, each measurement a fresh process, alternating."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), ref],
                       check=True, capture_output=True)
        try:
            trees = {ref: tree / "src", "this tree": root / "src"}
            got: dict[str, dict[int, list[dict]]] = {k: {12: [], 240: []} for k in trees}
            for rep in range(reps):
                order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
                for cohort in (12, 240):
                    for label in order:
                        env = {**os.environ, "PYTHONPATH": str(trees[label])}
                        r = subprocess.run([sys.executable, __file__, "--one", str(cohort), "--rounds", str(rounds)],
                                           env=env, capture_output=True, text=True, check=True)
                        got[label][cohort].append(json.loads(r.stdout.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)
    result = {}
    for label, by in got.items():
        result[label] = {}
        for cohort, rs in by.items():
            fixed = [1e3 * (r["round_s"] - r["clip_sum_s"]) for r in rs]
            result[label][str(cohort)] = {"fixed_ms_median": round(statistics.median(fixed), 2),
                                          "fixed_ms_all": [round(f, 2) for f in fixed],
                                          "round_ms_median": round(1e3 * statistics.median(r["round_s"] for r in rs), 2)}
            print(f"{label:>10}  cohort {cohort:>3}: fixed cost {result[label][str(cohort)]['fixed_ms_median']:7.2f} ms/round "
                  f"(all: {result[label][str(cohort)]['fixed_ms_all']})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "round_fixed_cost_compare.json"
    path.write_text(json.dumps({"ref": ref, "reps": reps, "rounds": rounds, "population": POPULATION,
                                "results": result}, indent=1))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--label", default="current")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--compare", metavar="REF", help="measure against this git revision, side by side")
    ap.add_argument("--one", type=int, metavar="COHORT", help=argparse.SUPPRESS)  # one measurement, JSON out
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(one_run(args.one, args.rounds)))
        return
    if args.compare:
        compare(args.compare, args.reps, args.rounds, args.out)
        return
    runs: dict[int, list[dict]] = {12: [], 240: []}
    for rep in range(args.reps):
        for cohort in (12, 240) if rep % 2 == 0 else (240, 12):
            runs[cohort].append(one_run(cohort, args.rounds))
    summary = {}
    for cohort, rs in runs.items():
        fixed = [r["round_s"] - r["clip_sum_s"] for r in rs]
        summary[str(cohort)] = {
            "fixed_ms_median": round(1e3 * statistics.median(fixed), 2),
            "fixed_ms_all": [round(1e3 * f, 2) for f in fixed],
            "round_ms_median": round(1e3 * statistics.median(r["round_s"] for r in rs), 2),
            "clip_sum_ms_median": round(1e3 * statistics.median(r["clip_sum_s"] for r in rs), 2),
            "mean_sampled": rs[0]["mean_sampled"], "model_params": rs[0]["model_params"],
        }
        s = summary[str(cohort)]
        print(f"cohort {cohort:>3} (population {POPULATION}, {args.rounds} rounds, default GPT "
              f"{rs[0]['model_params']:,} params): fixed cost {s['fixed_ms_median']:.2f} ms/round "
              f"(round {s['round_ms_median']:.2f} ms, clip+sum {s['clip_sum_ms_median']:.2f} ms)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"round_fixed_cost_{args.label}.json"
    path.write_text(json.dumps({"label": args.label, "reps": args.reps, "rounds": args.rounds,
                                "population": POPULATION, "cohorts": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
