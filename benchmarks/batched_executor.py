"""Updates per second of the sequential and the batched executor (``worker_kind = "batched"``).

One round's local training of ``--clients`` clients from the same global parameters, on the
3 x 128 GPT of the Shakespeare curve (block 80, batch 10, one epoch of local Adam 3e-3):
the sequential executor, then the batched one with K = ``--k`` clients per batch, alternating
A/B ``--reps`` times after one untimed warm-up of each. Clients are cut from tiny-shakespeare
(../shared/data/tinyshakespeare.txt, if present) or from generated Shakespeare-like verse, with
ragged sizes (``--min-chars`` to ``--max-chars``), so the batched executor pays for its masking.
Also reports the largest difference between the two executors' updates (a sanity check; it
includes the attention key bias, whose Adam update is rounding noise: tests/test_batched_executor.py).

    python benchmarks/batched_executor.py --device cuda --clients 64 --k 64 --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from privlm.api import Simulation
from privlm.config import load_config
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.engine.executor import ServerView
from privlm.federated.client import get_params
from privlm.runtime.batched import BatchedExecutor
from privlm.runtime.sequential import SequentialExecutor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = ["model.n_layer=3", "model.n_embd=128", "model.n_head=4", "model.block_size=80",
         "client.local_epochs=1", "client.batch_size=10", "client.optimizer=adam", "client.lr=0.003"]
WORDS = ("thou thee thy doth hath lord good sweet love death night king heart fair gentle speak "
         "honour blood grace sir madam come hence away tis nay ay forsooth villain noble").split()


def _text(chars: int, rng: np.random.Generator) -> tuple[str, str]:
    if SHARED.exists():
        return SHARED.read_text(encoding="utf-8"), "tiny-shakespeare"
    lines = []
    while sum(map(len, lines)) < chars:
        lines.append(" ".join(rng.choice(WORDS, size=rng.integers(4, 10))).capitalize() + ".")
    return "\n".join(lines), "generated verse"


def _corpus(args) -> tuple[FederatedCorpus, str]:
    rng = np.random.default_rng(0)
    sizes = rng.integers(args.min_chars, args.max_chars + 1, size=args.clients)
    text, source = _text(int(sizes.sum()) + 1000, rng)
    starts = rng.integers(0, max(1, len(text) - args.max_chars), size=args.clients)
    clients = tuple(ClientData(f"c{i}", text[s : s + n], text[-200:]) for i, (s, n) in enumerate(zip(starts, sizes)))
    return FederatedCorpus("bench", clients), source


def _time(ex, view: ServerView, ids: list[int], device: torch.device) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = list(ex.contributions(view, ids))  # (updates come back to the host: a sync)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=32, help="clients of the round")
    ap.add_argument("--k", type=int, default=None, help="clients per batch (default: all of the round)")
    ap.add_argument("--reps", type=int, default=3, help="A/B alternations")
    ap.add_argument("--min-chars", type=int, default=400)
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    k = args.k or args.clients
    corpus, source = _corpus(args)
    cfg = load_config(None, [*MODEL, f"device={args.device}", "privacy.mode=none",
                             f"federation.clients_per_round={args.clients}", "eval.max_clients=1"])
    sim = Simulation(cfg, corpus=corpus)
    params, device = get_params(sim.model), sim.clients.device
    view, ids = ServerView(params, 1, None), list(range(args.clients))
    runs = {"sequential": SequentialExecutor(sim.clients), "batched": BatchedExecutor(sim.clients, k)}
    outs = {name: _time(ex, view, ids, device)[1] for name, ex in runs.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, ex in runs.items():
            seconds[name].append(_time(ex, view, ids, device)[0])
    diff = max(float((a.update[n] - b.update[n]).abs().max())
               for a, b in zip(outs["sequential"], outs["batched"]) for n in params)
    rate = {name: args.clients / statistics.median(s) for name, s in seconds.items()}
    result = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "data": source,
        "clients": args.clients, "k": k, "reps": args.reps, "params": sim.model.num_params(),
        "windows": [-(-(t.numel() - 1) // cfg.model.block_size) for t in sim.clients.train_tokens],
        "seconds": seconds, "updates_per_s": rate, "speedup": rate["batched"] / rate["sequential"],
        "max_abs_update_diff": diff,
    }
    print(f"{source}, {args.clients} clients, K = {k}, {device}: sequential {rate['sequential']:.2f} updates/s, "
          f"batched {rate['batched']:.2f} updates/s ({result['speedup']:.2f}x); max |diff| {diff:.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"batched_executor_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
