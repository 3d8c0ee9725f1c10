"""Side-by-side measurements of the DP-FedAvg simulation, in one process.

(a) round time, privacy.mode = "user" vs "none", on the same sampled clients from the same
    global parameters (target: DP overhead <= 1.03x); plus the cost of the DP pieces alone
    (clip + noise) and of one accountant call;
(b) simulation training tokens/s vs a plain centralized loop of the same model, batch size
    and optimizer over the same clients' text (target: federated >= 0.8x centralized);
(c) peak RSS of one round with 10 vs 1,000 clients per round (fresh subprocess each; target:
    within ~3x, i.e. aggregation memory is O(model), not O(clients x model)).

    python benchmarks/overhead.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.federated import dp_fedavg
from privlm.federated.client import make_windows
from privlm.federated.client import lm_loss, make_optimizer
from privlm.privacy import epsilon_for
from privlm.privacy.ledger import Ledger
from privlm.privacy.mechanism import NoiseSource
from privlm.api import Simulation


def _sim(mode: str, extra=()) -> Simulation:
    cfg = load_config(None, ["data.num_clients=2000", f"privacy.mode={mode}",
                             "privacy.noise_multiplier=1.0", "federation.clients_per_round=40", *extra])
    return Simulation(cfg)


def round_time(reps: int) -> dict:
    user, none = _sim("user"), _sim("none")
    ids = list(range(0, 2000, 50))  # the same 40 clients for both
    start = dp_fedavg.init(user.algo, {n: p.detach().clone() for n, p in user.model.named_parameters()})
    times = {"user": [], "none": []}
    for rep in range(reps):
        for mode, sim in (("user", user), ("none", none)) if rep % 2 == 0 else (("none", none), ("user", user)):
            t = time.perf_counter()
            dp_fedavg.apply(sim.algo, start, sim.contributions(start, ids),
                            NoiseSource().generator(1) if sim.algo.private else None)
            times[mode].append(time.perf_counter() - t)
    # The DP-only pieces, isolated: clip 40 updates + one noise draw, and one accountant call.
    params = start.params
    upd = {k: torch.randn_like(v) * 0.01 for k, v in params.items()}
    from privlm.federated.aggregation import RunningSum, dp_mean

    t = time.perf_counter()
    rs = RunningSum.zeros_like(params, 1.0)
    for _ in ids:
        rs.add(upd)
    dp_mean(rs, 1.0, 40, NoiseSource().generator(1))
    dp_pieces = time.perf_counter() - t
    led = Ledger()
    for r in range(1, 51):
        led.append(r, user.algo.round_event())
    t = time.perf_counter()
    epsilon_for(led, 1e-5, "pld")
    acct = time.perf_counter() - t
    med_u, med_n = statistics.median(times["user"]), statistics.median(times["none"])
    return {"round_seconds_user": med_u, "round_seconds_none": med_n, "dp_overhead_ratio": med_u / med_n,
            "clip_and_noise_seconds_per_round": dp_pieces, "pld_epsilon_seconds_50_rounds": acct,
            "clients_per_round": len(ids), "params": user.model.num_params(), "reps": reps}


def throughput(num_clients: int) -> dict:
    sim = _sim("user")
    ids = list(range(num_clients))
    start = dp_fedavg.init(sim.algo, {n: p.detach().clone() for n, p in sim.model.named_parameters()})
    tokens = sum(int((make_windows(sim.train_tokens[i], sim.model.cfg.block_size)[1] >= 0).sum()) for i in ids)
    t = time.perf_counter()
    dp_fedavg.apply(sim.algo, start, sim.contributions(start, ids), NoiseSource().generator(1))
    fed = time.perf_counter() - t
    # Centralized: one model, one Adam, the same windows in full batches of the same size.
    model = sim.model
    xs, ys = zip(*(make_windows(sim.train_tokens[i], model.cfg.block_size) for i in ids))
    x, y = torch.cat(xs), torch.cat(ys)
    opt = make_optimizer(model, sim.local)  # the same optimizer as local training
    B = sim.cfg.client.batch_size
    perm = torch.randperm(x.size(0))
    t = time.perf_counter()
    for i in range(0, x.size(0), B):
        idx = perm[i:i + B]
        loss = lm_loss(model, x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    cen = time.perf_counter() - t
    return {"tokens": tokens, "federated_tokens_per_s": tokens / fed, "centralized_tokens_per_s": tokens / cen,
            "federated_over_centralized": cen / fed, "clients": num_clients, "batch_size": B}


def peak_rss_child(clients_per_round: int) -> None:
    cfg = load_config(None, ["data.num_clients=5000", f"federation.clients_per_round={clients_per_round}",
                             "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000",
                             "model.n_embd=256", "model.n_layer=4", "client.local_steps=1"])
    sim = Simulation(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = dp_fedavg.init(sim.algo, {n: p.detach().clone() for n, p in sim.model.named_parameters()})
    import numpy as np

    ids = sim.algo.sample_clients(np.random.default_rng(0))
    _, stats = dp_fedavg.apply(sim.algo, start, sim.contributions(start, ids), NoiseSource().generator(1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model_mb = sum(p.numel() * 4 for p in sim.model.parameters()) / 2**20
    print(json.dumps({"clients": stats.clients, "peak_rss_mb": peak / 1024, "rss_before_round_mb": base / 1024,
                      "model_mb": model_mb}))


def memory() -> dict:
    out = {}
    for m in (10, 1000):
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(m)], capture_output=True, text=True,
                             check=True)
        out[m] = json.loads(res.stdout.strip().splitlines()[-1])
    return {"rss_10": out[10], "rss_1000": out[1000],
            "peak_ratio_1000_vs_10": out[1000]["peak_rss_mb"] / out[10]["peak_rss_mb"],
            "round_growth_mb_1000": out[1000]["peak_rss_mb"] - out[1000]["rss_before_round_mb"],
            "if_one_update_per_client_mb": out[1000]["clients"] * out[1000]["model_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        peak_rss_child(args.rss_child)
        return
    result = {"torch_threads": torch.get_num_threads()}
    result["round_time"] = round_time(args.reps)
    print(json.dumps(result["round_time"], indent=2), flush=True)
    result["throughput"] = throughput(100)
    print(json.dumps(result["throughput"], indent=2), flush=True)
    result["memory"] = memory()
    print(json.dumps(result["memory"], indent=2), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
