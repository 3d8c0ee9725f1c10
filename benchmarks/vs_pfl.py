"""privlm against Apple pfl 0.6.0: steady DP-FedAvg throughput on one workload (issue #22.1).

One workload definition builds both sides: tiny Shakespeare (``../shared/data/tinyshakespeare.txt``)
cut into clients of exactly ``W`` windows of 64 characters (the first 1,024,000 characters; the next
12,800 are the held-out windows), privlm's GPT (2 layers x 64, 4 heads, byte tokenizer), one local
Adam step over the client's whole text (lr 3e-3), user-level DP with clip C = 0.5 and noise
multiplier z = 0.5, 5 rounds. privlm builds the corpus and the initial model; its exact windows and
initial weights go to pfl in one ``.npz`` (no pickle), and pfl trains the same ``GPT`` class (loaded
from privlm's ``models/transformer.py`` file, which needs only torch) through its own
``PyTorchModel``, ``FederatedAveraging``, ``SimulatedBackend`` and ``CentrallyAppliedPrivacyMechanism
(GaussianMechanism(C, z))``.

Sampling differs by design and is reported: privlm samples each client with probability q = cohort / N
(Poisson, what its accountant assumes); pfl draws a fixed cohort of ``cohort`` clients. Throughput
counts the updates each side actually trained. Steady throughput is updates / s over rounds 2-5
(time between the end of round 1 and the end of round 5, stamped in each side's own per-round hook:
privlm's ``stop_when``, pfl's ``after_central_iteration``); "command" is the wall time of the whole
process, imports and data set-up included. Runs alternate privlm / pfl (pfl first on odd reps).

Four cases: (12 clients a round, 16 windows each; N = 1,000) and (200 a round, 2 windows each;
N = 8,000), each with one process per side and with two (privlm ``workers = 2``,
``worker_kind = "process"``; pfl under ``torchrun --nproc_per_node 2``, each process 1 torch thread).

pfl runs in its own virtual environment (pfl needs dp-accounting < 0.6, privlm pins a later one),
made at ``benchmarks/out/pflenv`` on first use unless ``--pfl-python`` names one:

    python benchmarks/vs_pfl.py --reps 3 [--pfl-python /tmp/pflenv/bin/python] [--out benchmarks/out]

Writes ``<out>/vs_pfl.json`` and prints a table; RESULTS.md holds the latest one.
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

from banded_mf_vs_pfl import pfl_python  # pfl's own venv at benchmarks/out/pflenv (a sibling script)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BLOCK, ROUNDS, CLIP, Z, LR, DELTA = 64, 5, 0.5, 0.5, 3e-3, 1e-5
TRAIN_CHARS, HELDOUT_WINDOWS = 1_024_000, 200
CASES = {"12x16": (12, 16), "200x2": (200, 2)}  # name: (clients a round, windows per client)


# -- the workload, built by privlm ---------------------------------------------------------------------------
def _overrides(cohort: int, population: int, windows: int, workers: int) -> list[str]:
    return ["data.source=dir", "data.scrub.enabled=false", "model.kind=transformer",
            f"model.block_size={BLOCK}", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
            "client.optimizer=adam", f"client.lr={LR}", "client.local_steps=1", f"client.batch_size={windows}",
            f"federation.clients_per_round={cohort}", f"federation.rounds={ROUNDS}",
            "privacy.mode=user", f"privacy.clip_norm={CLIP}", f"privacy.noise_multiplier={Z}",
            f"privacy.delta={DELTA}",
            f"eval.every={ROUNDS + 1}", "eval.max_clients=1", "output.checkpoint_every=1000",
            f"workers={workers}", "worker_kind=process" if workers > 1 else "worker_kind=thread"]


def _corpus(windows: int):
    from privlm.data.corpus import ClientData, FederatedCorpus

    text = DATA.read_text(encoding="utf-8")
    per = windows * BLOCK
    n = TRAIN_CHARS // per
    # Each client's text is its own slice of per + 1 characters: per (input, next) pairs, so exactly
    # `windows` full windows. The test text is unused (evaluation is off).
    clients = tuple(ClientData(client_id=f"c{i:05d}", train=text[i * per: i * per + per + 1], test=".")
                    for i in range(n))
    heldout = text[TRAIN_CHARS: TRAIN_CHARS + HELDOUT_WINDOWS * BLOCK + 1]
    return FederatedCorpus(name="tinyshakespeare-windows", clients=clients), heldout


def privlm_side(case: str, workers: int, npz: Path | None) -> dict:
    """One privlm run in this process; with ``npz``, also writes the workload for pfl."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from privlm.api import Simulation
    from privlm.config import load_config
    from privlm.federated.client import lm_loss, make_windows

    t0 = time.perf_counter()
    cohort, windows = CASES[case]
    corpus, heldout = _corpus(windows)
    cfg = load_config(None, _overrides(cohort, corpus.num_clients, windows, workers))
    sim = Simulation(cfg, corpus=corpus)
    tok = sim.tokenizer
    xs, ys = zip(*(make_windows(t, BLOCK) for t in sim.train_tokens))
    assert all(x.shape[0] == windows for x in xs), "each client must have exactly W windows"
    hx, hy = make_windows(torch.as_tensor(tok.encode(heldout), dtype=torch.long), BLOCK)
    init = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
    if npz is not None:
        np.savez(npz, x=torch.stack(xs).numpy(), y=torch.stack(ys).numpy(), hx=hx.numpy(), hy=hy.numpy(),
                 vocab=np.int64(tok.vocab_size), **{"w_" + k: v.numpy() for k, v in init.items()})
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t_run = time.perf_counter()
        result = sim.run(run_dir, progress=False, stop_when=lambda row: stamps.append(time.perf_counter()) and False)
        state = load_file(str(run_dir / "state.safetensors"))
    sim.close()
    params = {k[len("params/"):]: v for k, v in state.items() if k.startswith("params/")}
    model = sim.model
    missing = set(params) - set(model.state_dict())
    assert params and not missing, f"state.safetensors params do not fit the model: {sorted(missing)[:3]}"
    model.load_state_dict({**model.state_dict(), **params})
    model.eval()
    with torch.no_grad():
        loss = float(lm_loss(model, hx, hy))
    sampled = [int(m["sampled"]) for m in result.metrics]
    return {"side": "privlm", "case": case, "processes": workers, "population": corpus.num_clients,
            "sampled": sampled, "round_end_s": [s - t_run for s in stamps], "setup_s": t_run - t0,
            "steady_updates_per_s": sum(sampled[1:]) / (stamps[-1] - stamps[0]),
            "heldout_loss": loss, "epsilon": result.epsilon, "delta": result.delta,
            "params_loaded": len(params)}


PFL_PROGRAM = r"""
import importlib.util, json, os, sys, time
import numpy as np, torch, torch.nn.functional as F
args = json.loads(sys.argv[1])
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("privlm_transformer", args["transformer_py"])
tr = importlib.util.module_from_spec(spec); sys.modules[spec.name] = tr; spec.loader.exec_module(tr)
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism, PLDPrivacyAccountant

t0 = time.perf_counter()
d = np.load(args["npz"], allow_pickle=False)
x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
N, V = x.shape[0], int(d["vocab"])

class GPT(tr.GPT):
    def loss(self, x, y, is_eval=False):
        self.eval() if is_eval else self.train()
        logits = self(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        n = int((y >= 0).sum())
        return {"loss": Weighted(float(self.loss(x, y, is_eval=True)) * n, n)}

net = GPT(tr.GPTConfig(vocab_size=V, block_size=args["block"], n_layer=2, n_head=4, n_embd=64, dropout=0.0))
net.load_state_dict({k[2:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("w_")})
model = PyTorchModel(model=net, local_optimizer_create=torch.optim.Adam,
                     central_optimizer=torch.optim.SGD(net.parameters(), 1.0))
fed = FederatedDataset(lambda uid: Dataset(raw_data=[x[uid], y[uid]], user_id=uid),
                       get_user_sampler("random", list(range(N))))
backend = SimulatedBackend(training_data=fed, val_data=None,
                           postprocessors=[CentrallyAppliedPrivacyMechanism(GaussianMechanism(args["clip"], args["z"]))])
stamps, counts = [], []
class Stamp(TrainingProcessCallback):
    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        stamps.append(time.perf_counter())
        for name, value in aggregate_metrics:
            if "number of devices" in str(name):
                counts.append(int(value))
        return False, __import__("pfl.metrics", fromlist=["Metrics"]).Metrics()
t_run = time.perf_counter()
FederatedAveraging().run(
    algorithm_params=NNAlgorithmParams(central_num_iterations=args["rounds"], evaluation_frequency=10**6,
                                       train_cohort_size=args["cohort"], val_cohort_size=0),
    backend=backend, model=model,
    model_train_params=NNTrainHyperParams(local_learning_rate=args["lr"], local_num_epochs=1,
                                          local_batch_size=x.shape[1] and args["windows"]),
    model_eval_params=NNEvalHyperParams(local_batch_size=256), callbacks=[Stamp()])
if int(os.environ.get("RANK", "0")) == 0:
    net.eval()
    with torch.no_grad():
        loss = float(net.loss(torch.from_numpy(d["hx"]), torch.from_numpy(d["hy"]), is_eval=True))
    acc = PLDPrivacyAccountant(num_compositions=args["rounds"], sampling_probability=args["cohort"] / N,
                               mechanism="gaussian", noise_parameter=args["z"], delta=args["delta"])
    print("PFL_JSON " + json.dumps({"round_end_s": [s - t_run for s in stamps], "setup_s": t_run - t0,
                                    "devices": counts, "heldout_loss": loss, "epsilon": float(acc.epsilon)}))
"""


def run_pfl(python: str, npz: Path, case: str, processes: int) -> dict:
    cohort, windows = CASES[case]
    args = json.dumps({"npz": str(npz), "transformer_py": str(ROOT / "src/privlm/models/transformer.py"),
                       "block": BLOCK, "cohort": cohort, "windows": windows, "rounds": ROUNDS, "lr": LR,
                       "clip": CLIP, "z": Z, "delta": DELTA})
    if processes == 1:
        cmd = [python, "-c", PFL_PROGRAM, args]
    else:
        script = npz.with_suffix(".pfl.py")
        script.write_text(PFL_PROGRAM)
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), args]
    with tempfile.TemporaryDirectory(prefix="pfl-") as cwd:
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                              if processes > 1 else None)
        wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PFL_JSON ")]
    if proc.returncode or not lines:
        raise SystemExit(f"pfl failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    r = json.loads(lines[-1][len("PFL_JSON "):])
    stamps = r["round_end_s"]
    # pfl's cohort is fixed; its "number of devices" metric, where reported, is the cohort trained.
    per_round = r["devices"] or [cohort] * len(stamps)
    return {"side": "pfl", "case": case, "processes": processes, "command_s": wall, **r,
            "sampled": per_round, "steady_updates_per_s": sum(per_round[1:]) / (stamps[-1] - stamps[0])}


def run_privlm(case: str, processes: int, npz: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--one-privlm", case, "--processes", str(processes)]
    if npz is not None:
        cmd += ["--npz", str(npz)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"privlm failed (rc {proc.returncode}):\n{proc.stderr[-5000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="12x16,200x2")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--pfl-python")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--one-privlm", help=argparse.SUPPRESS)
    ap.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_privlm:
        print(json.dumps(privlm_side(args.one_privlm, int(args.processes), args.npz)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    python = pfl_python(args.pfl_python)  # (benchmarks/out/pflenv, shared with banded_mf_vs_pfl.py)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vs-pfl-", dir=args.out) as tmp:
        for case in args.cases.split(","):
            npz = Path(tmp) / f"{case}.npz"
            run_privlm(case, 1, npz)  # writes the workload (this run is a warm-up and not counted)
            for procs in (int(p) for p in args.processes.split(",")):
                for rep in range(args.reps):
                    order = ("privlm", "pfl") if rep % 2 == 0 else ("pfl", "privlm")
                    for side in order:
                        r = run_privlm(case, procs, None) if side == "privlm" else run_pfl(python, npz, case, procs)
                        r["rep"] = rep
                        runs.append(r)
                        print(f"{case:>6} x{procs} rep {rep} {side:>6}: {r['steady_updates_per_s']:8.1f} updates/s steady, "
                              f"command {r['command_s']:6.1f} s, held-out loss {r['heldout_loss']:.4f}, "
                              f"eps {r['epsilon']:.3f}", flush=True)
    table = []
    for case in args.cases.split(","):
        for procs in (int(p) for p in args.processes.split(",")):
            got = {s: [r for r in runs if r["case"] == case and r["processes"] == procs and r["side"] == s]
                   for s in ("privlm", "pfl")}
            med = {s: statistics.median(r["steady_updates_per_s"] for r in rs) for s, rs in got.items()}
            cmd = {s: statistics.median(r["command_s"] for r in rs) for s, rs in got.items()}
            table.append({"case": case, "processes": procs, "privlm_updates_per_s": med["privlm"],
                          "pfl_updates_per_s": med["pfl"], "ratio": med["privlm"] / med["pfl"],
                          "privlm_command_s": cmd["privlm"], "pfl_command_s": cmd["pfl"],
                          "privlm_epsilon": got["privlm"][0]["epsilon"], "pfl_epsilon": got["pfl"][0]["epsilon"],
                          "privlm_loss": statistics.median(r["heldout_loss"] for r in got["privlm"]),
                          "pfl_loss": statistics.median(r["heldout_loss"] for r in got["pfl"])})
    print("\n| case | processes | privlm updates/s | pfl updates/s | privlm / pfl | command s privlm / pfl "
          "| eps privlm / pfl | held-out loss privlm / pfl |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['case']} | {t['processes']} | {t['privlm_updates_per_s']:.1f} | {t['pfl_updates_per_s']:.1f} | "
              f"**{t['ratio']:.2f}x** | {t['privlm_command_s']:.1f} / {t['pfl_command_s']:.1f} | "
              f"{t['privlm_epsilon']:.3f} / {t['pfl_epsilon']:.3f} | {t['privlm_loss']:.4f} / {t['pfl_loss']:.4f} |")
    path = args.out / "vs_pfl.json"
    path.write_text(json.dumps({"rounds": ROUNDS, "clip": CLIP, "z": Z, "delta": DELTA, "lr": LR, "block": BLOCK,
                                "cases": CASES, "table": table, "runs": runs}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
