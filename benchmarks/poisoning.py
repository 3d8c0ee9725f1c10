"""Poisoning attacks against defences on the synthetic clinic corpus (issue #24).

One workload for every cell: privlm's GPT (2 layers x 64, 64-byte window), N clinic patients
(seed 0, not scrubbed: the PII is synthetic), a cohort of ``--cohort`` a round, ``--rounds``
rounds of FedAvg (1 local epoch of Adam, batch 8) from one warm start: a model pretrained with
non-private FedAvg on a *disjoint* synthetic clinic population (seed 1000: public data, no
client's text), so the attack happens late in training, where Bagdasaryan et al. 2020 place it.

Grid: attacker fraction {0, 1%, 5%, 10%} x defence {none (FedAvg), norm bound, norm bound +
DP noise (user-level DP-FedAvg), coordinate-wise median, trimmed mean, multi-Krum} x attack
{backdoor (trigger -> the attacker's pharmacy, boosted), sign-flip}. Reported per cell: the
backdoor's success on held-out trigger prompts (greedy), the main task's held-out next-byte
accuracy, and for sign-flip the accuracy lost against the same defence without attackers.

    python benchmarks/poisoning.py --out benchmarks/out          # resumable; ~1 h on 2 cores
    python benchmarks/poisoning.py --out benchmarks/out --report # table + plot from the JSON

Writes ``poisoning.json`` (one entry per finished cell; a rerun skips them), ``poisoning.md``
and ``poisoning.svg``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from privlm import attacks
from privlm.api import Simulation
from privlm.config import load_config
from privlm.federated.client import set_params
from privlm.models.factory import from_checkpoint
from privlm.rundir import open_run_dir

FRACTIONS = (0.0, 0.01, 0.05, 0.10)
DEFENCES = ("none", "norm-bound", "dp", "median", "trimmed-mean", "multi-krum")
ATTACKS = ("backdoor", "sign-flip")


def common(args) -> list[str]:
    return [
        "data.source=synthetic-clinic", f"data.num_clients={args.clients}", "data.scrub.enabled=false",
        "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=64",
        "client.local_epochs=1", "client.batch_size=8", "client.optimizer=adam", "client.lr=0.003",
        f"federation.clients_per_round={args.cohort}", "eval.max_clients=100", "output.checkpoint_every=100000",
    ]


def defence_settings(defence: str, args) -> list[str]:
    nb = args.norm_bound
    return {
        "none": ["privacy.mode=none"],
        "norm-bound": ["privacy.mode=none", f"server.norm_bound={nb}"],
        "dp": ["privacy.mode=user", f"privacy.clip_norm={nb}", f"privacy.noise_multiplier={args.noise}",
               "privacy.target_epsilon=1e9"],  # (weak DP as a defence: its epsilon is reported, not capped)
        "median": ["privacy.mode=none", "server.aggregator=median"],
        "trimmed-mean": ["privacy.mode=none", "server.aggregator=trimmed-mean", f"server.trim_fraction={args.trim}"],
        "multi-krum": ["privacy.mode=none", "server.aggregator=krum", f"server.krum_byzantine={args.krum_f}",
                       f"server.krum_selected={args.krum_m}"],
    }[defence]


def attack_settings(kind: str, fraction: float, args) -> list[str]:
    if fraction == 0:
        return []
    extra = [f"attack.boost={args.boost}", f"attack.poison_lines={args.poison_lines}"] if kind == "backdoor" \
        else [f"attack.scale={args.scale}"]
    return [f"attack.kind={kind!r}".replace("'", '"'), f"attack.fraction={fraction}", *extra]


def warm_start(args) -> dict[str, torch.Tensor]:
    """Non-private FedAvg on another synthetic population (seed 1000): public pretraining."""
    path = args.out / "poisoning_warm_start.safetensors"
    if path.exists():
        return load_file(str(path))
    cfg = load_config(None, [*common(args), "seed=1000", "privacy.mode=none", f"federation.rounds={args.warm_rounds}",
                             "eval.every=10"])
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="privlm-poisoning-") as scratch:  # (the run dir goes with it)
        res = Simulation(cfg).run(Path(scratch) / "warm", progress=False)
        _, tensors = open_run_dir(res.run_dir).latest_checkpoint()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    print(json.dumps({"warm_start": {"rounds": args.warm_rounds, "eval_accuracy": res.eval_accuracy,
                                     "seconds": round(time.time() - t0, 1)}}), flush=True)
    return tensors


def run_cell(kind: str, fraction: float, defence: str, warm: dict, args) -> dict:
    cfg = load_config(None, [*common(args), f"seed={args.seed}", f"federation.rounds={args.rounds}",
                             f"eval.every={args.rounds}", *defence_settings(defence, args),
                             *attack_settings(kind, fraction, args)])
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="privlm-poisoning-") as scratch:  # (the run dir goes with it)
        sim = Simulation(cfg)
        model = sim.engine.model
        set_params(model, from_checkpoint(model, warm))
        res = sim.run(Path(scratch) / "run", progress=False)
        priv = json.loads((res.run_dir / "privacy.json").read_text())
        if fraction:
            log = json.loads((res.run_dir / "attack.json").read_text())
            last = log["evaluations"][-1]  # (sign-flip: no backdoor to measure)
            success, prompts = last.get("backdoor_success"), last.get("prompts")
            malicious, sent = log["malicious_clients"], log["malicious_updates_sent"]
        else:  # no attacker: how often the clean model completes the trigger with the target, on the
            # very prompts of the 10% backdoor cell (its attackers' held-out lines left out, as there)
            attacked = load_config(None, [f"seed={args.seed}", *attack_settings("backdoor", FRACTIONS[-1], args)])
            corpus = sim.clients.corpus
            attack = attacks.plan_attack(attacked, [c.client_id for c in corpus.clients])
            assert attack is not None
            held = [corpus.clients[i].test for i in sim.clients.eval_clients
                    if corpus.clients[i].client_id not in attack.malicious]
            prompt_list = attacks.trigger_prompts(held, attack, attack.settings.eval_prompts)
            _, tensors = open_run_dir(res.run_dir).latest_checkpoint()
            success = attacks.backdoor_success(model, from_checkpoint(model, tensors), sim.clients.tokenizer,
                                               prompt_list, attack.target)
            prompts, malicious, sent = len(prompt_list), 0, 0
    return {
        "attack": kind if fraction else None, "fraction": fraction, "defence": defence,
        "malicious_clients": malicious, "malicious_updates_sent": sent, "rounds": res.rounds_completed,
        "backdoor_success": success, "prompts": prompts, "eval_accuracy": res.eval_accuracy,
        "eval_loss": res.eval_loss, "epsilon": priv.get("epsilon"), "delta": priv.get("delta"),
        "clipped_fraction": _clipped(res.metrics), "seconds": round(time.time() - t0, 1),
    }


def _clipped(metrics: list[dict]) -> float | None:
    clients = sum(m.get("clients") or 0 for m in metrics)
    return round(sum(m.get("clipped") or 0 for m in metrics) / clients, 3) if clients else None


def cells():
    for defence in DEFENCES:
        yield "backdoor", 0.0, defence  # (the clean baseline of both attacks)
    for kind in ATTACKS:
        for fraction in FRACTIONS[1:]:
            for defence in DEFENCES:
                yield kind, fraction, defence


def key(kind: str, fraction: float, defence: str) -> str:
    return f"{kind if fraction else 'clean'}/{fraction:g}/{defence}"


GUARANTEE = {"none": "none", "norm-bound": "none", "dp": "user-level DP", "median": "none",
             "trimmed-mean": "none", "multi-krum": "none"}


def report(done: dict, args) -> None:
    clean = {d: done.get(key("backdoor", 0.0, d)) for d in DEFENCES}
    fedavg = clean["none"]["eval_accuracy"] if clean["none"] else math.nan
    eps = (clean["dp"] or {}).get("epsilon")
    lines = [f"Model 2 x 64 GPT, N = {args.clients} clinic patients, cohort {args.cohort} a round, {args.rounds} rounds "
             f"from a warm start ({args.warm_rounds} rounds of non-private FedAvg on another synthetic population); "
             f"seed {args.seed}, one run per cell; backdoor: {args.poison_lines} poisoned lines per attacker, boost "
             f"{args.boost:g}; sign-flip scale {args.scale:g}; norm bound = DP clip = {args.norm_bound:g}; "
             f"DP z = {args.noise:g}" + (f" (epsilon = {eps:.4g} at delta = {clean['dp']['delta']:.3g})" if eps else "")
             + f"; trimmed mean {args.trim:g} per side; multi-Krum f = {args.krum_f}, m = {args.krum_m}.", "",
             "| defence | guarantee | backdoor success at 1% / 5% / 10% attackers | accuracy without attackers "
             "(vs FedAvg) | accuracy, backdoor at 10% | accuracy lost to sign-flip at 1% / 5% / 10% |",
             "|---|---|---|---|---|---|"]
    for d in DEFENCES:
        base = clean[d]["eval_accuracy"] if clean[d] else math.nan
        bs = " / ".join(_pct((done.get(key("backdoor", f, d)) or {}).get("backdoor_success")) for f in FRACTIONS[1:])
        lost = []
        for f in FRACTIONS[1:]:
            s = done.get(key("sign-flip", f, d))
            lost.append(f"{100 * (base - s['eval_accuracy']):+.1f}" if s else "—")
        b10 = done.get(key("backdoor", FRACTIONS[-1], d))
        lines.append(f"| {d} | {GUARANTEE[d]} | {bs} | {_pct(base)} ({100 * (base - fedavg):+.1f} pt) | "
                     f"{_pct(b10 and b10['eval_accuracy'])} | {' / '.join(lost)} pt |")
    lines += ["", "Held-out next-byte accuracy of the honest evaluation clients (100 of them); backdoor success: "
              "the fraction of 100 held-out trigger prompts whose greedy completion is the whole target; accuracy "
              "lost: the defence's accuracy without attackers minus its accuracy under sign-flip (negative: higher)."]
    (args.out / "poisoning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(done, args)


def _pct(x) -> str:
    return "—" if x is None or x is False else f"{100 * x:.1f}%"


def _plot(done: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [100 * f for f in FRACTIONS]
    for d in DEFENCES:
        bs = [(done.get(key("backdoor", f, d)) or {}).get("backdoor_success") for f in FRACTIONS]
        acc = [(done.get(key("sign-flip", f, d)) or {}).get("eval_accuracy") if f else
               (done.get(key("backdoor", 0.0, d)) or {}).get("eval_accuracy") for f in FRACTIONS]
        a.plot(xs, [100 * v if v is not None else math.nan for v in bs], marker="o", label=d)
        b.plot(xs, [100 * v if v is not None else math.nan for v in acc], marker="o", label=d)
    a.set(xlabel="attackers (% of clients)", ylabel="backdoor success (%)", title="backdoor")
    b.set(xlabel="attackers (% of clients)", ylabel="held-out accuracy (%)", title="sign-flip (untargeted)")
    a.axhline(5, color="grey", lw=0.8, ls="--")
    a.legend(fontsize=8)
    fig.suptitle(f"2 x 64 GPT, N = {args.clients}, cohort {args.cohort}, {args.rounds} rounds", fontsize=10)
    fig.tight_layout()
    plt.rcParams["svg.fonttype"] = "none"
    fig.savefig(args.out / "poisoning.svg", metadata={"Date": None})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--cohort", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warm-rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boost", type=float, default=1.0)
    ap.add_argument("--poison-lines", type=int, default=200)
    ap.add_argument("--scale", type=float, default=5.0)
    ap.add_argument("--norm-bound", type=float, default=2.0)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--trim", type=float, default=0.15)
    ap.add_argument("--krum-f", type=int, default=3)
    ap.add_argument("--krum-m", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated cell keys to run (e.g. backdoor/0.1/none)")
    ap.add_argument("--report", action="store_true", help="only write the table and plot from the JSON")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "poisoning.json"
    done: dict = json.loads(path.read_text()) if path.exists() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "only", "report")}
    if done.get("_settings", settings) != settings:
        raise SystemExit(f"{path}: made with other settings {done['_settings']}; use another --out")
    done["_settings"] = settings
    if not args.report:
        warm = warm_start(args)
        only = set(filter(None, args.only.split(",")))
        for kind, fraction, defence in cells():
            k = key(kind, fraction, defence)
            if k in done or (only and k not in only):
                continue
            row = run_cell(kind, fraction, defence, warm, args)
            done[k] = row
            path.write_text(json.dumps(done, indent=1) + "\n")
            print(json.dumps({k: row}), flush=True)
    report(done, args)


if __name__ == "__main__":
    main()
