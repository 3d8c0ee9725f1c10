"""DP-SGD local-training overhead vs the same non-private local training (issue #5).

Side by side in one process, interleaved, same records, same batch (every step
uses a fixed batch of B records, so both sides do identical work apart from DP):
plain local training (``lm_loss`` + Adam) vs privlm's DP-SGD step (Opacus
per-record gradients, per-record clipping, one noise draw, Adam), per Opacus
grad-sample mode, for the from-scratch transformer and a LoRA model (GPT-2
architecture, random weights, built from a config).

    python benchmarks/dpsgd_overhead.py --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from privlm.federated.client import LocalTraining, get_params, local_train, set_params
from privlm.federated.dp_sgd import ExampleDP, dp_sgd_train, record_windows
from privlm.models import GPT, GPTConfig


def _models(block: int):
    torch.manual_seed(0)
    yield "transformer (2 layers, d=128)", GPT(GPTConfig(block_size=block, n_layer=2, n_embd=128, n_head=4))
    try:
        import transformers
        from peft import LoraConfig, get_peft_model

        from privlm.models.hf import LoRACausalLM
    except ImportError:
        return
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=2048, n_positions=block, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    yield "GPT-2 (4 layers, d=256) + LoRA r=8", LoRACausalLM(lora, block)


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, model in _models(args.block):
        vocab = model.cfg.vocab_size if hasattr(model.cfg, "vocab_size") else 2048
        records = [torch.randint(0, vocab, (args.block + 1,)) for _ in range(args.batch)]
        x, y, _ = record_windows(records, args.block)
        params = get_params(model)
        cfg = LocalTraining(steps=args.steps, batch_size=args.batch, lr=1e-3, optimizer="adam")
        tokens = torch.cat([torch.cat([r[:-1] for r in records]), records[-1][-1:]])

        def plain():
            # The non-private client loop on the same tokens: B windows of block tokens per step.
            local_train(model, params, tokens, cfg, torch.Generator().manual_seed(0))

        def dp(mode):
            # q = 1: every step takes all B records (same batch as plain), clip + noise + Adam.
            spec = ExampleDP(1.0, 1.0, 1.0, mode)
            return lambda: dp_sgd_train(model, params, x, y, cfg, spec, np.random.default_rng(0),
                                        np.random.default_rng(1))

        fns = {"none": plain, "hooks": dp("hooks"), "functorch": dp("functorch"), "ghost": dp("ghost")}
        times = {k: [] for k in fns}
        for _ in range(args.reps):  # interleaved, so machine noise hits every variant alike
            for k, fn in fns.items():
                times[k].append(_time(fn, 1))
        set_params(model, params)
        med = {k: statistics.median(v) for k, v in times.items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {"model": name, "trainable_params": trainable, "batch": args.batch, "block": args.block,
               "steps": args.steps, "seconds": med,
               "overhead": {k: med[k] / med["none"] for k in ("hooks", "functorch", "ghost")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dpsgd_overhead.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
