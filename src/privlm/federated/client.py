"""Local training on one client's own text (the client side of FedAvg).

FedJAX's client_init / client_step / client_final, as one readable loop:
start from the global parameters, run E epochs (or K steps) of SGD/Adam over
the client's token windows, return ``local - global``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from privlm.models.params import block_size, get_params, model_device, set_params  # noqa: F401 (re-exported)

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTraining:
    epochs: int = 1
    steps: int | None = None  # if set, overrides epochs: exactly this many batches
    batch_size: int = 16
    lr: float = 0.5
    optimizer: Literal["sgd", "adam"] = "sgd"


@dataclass(frozen=True)
class ClientResult:
    update: Params  # local - global, one tensor per trainable parameter
    num_tokens: int  # training targets seen per epoch (the FedAvg weight n_k)
    loss_sum: float  # sum of training losses over steps
    steps: int


def model_update(model: nn.Module, global_params: Params) -> Params:
    """``local - global`` for every trained tensor, in host memory like ``global_params``."""
    return {n: p.detach().to(global_params[n].device) - global_params[n]
            for n, p in model.named_parameters() if n in global_params}


def make_windows(tokens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into (input, target) windows of ``block_size``.

    Windows do not overlap; the last one is right-padded, with target -1
    (ignored by the loss), so no token of the client is dropped.
    """
    n = tokens.numel() - 1  # number of (input, next-token) pairs
    if n <= 0:
        empty = torch.empty(0, block_size, dtype=torch.long)
        return empty, empty
    num = (n + block_size - 1) // block_size
    x = torch.zeros(num * block_size, dtype=torch.long)
    y = torch.full((num * block_size,), -1, dtype=torch.long)
    x[:n] = tokens[:-1]
    y[:n] = tokens[1:]
    return x.view(num, block_size), y.view(num, block_size)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    logits = model(x)
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction=reduction
    )


def make_optimizer(model: nn.Module, cfg: LocalTraining, fused: bool = True) -> torch.optim.Optimizer:
    """A fresh local optimizer (no state carried between rounds or clients).

    Adam uses torch's fused kernel (one kernel for all tensors, on the CPU as on
    the GPU) where the parameters allow it, else the multi-tensor ``foreach`` one:
    with one or a few local steps per client the optimizer's per-tensor work is
    a large share of a client's time. ``fused=False`` keeps ``foreach`` (DP-SGD's
    Opacus optimizer wraps this one).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, foreach=True)
    if fused and _fused_adam_ok(params):
        return torch.optim.Adam(params, lr=cfg.lr, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, foreach=True)


def _fused_adam_ok(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused Adam takes these parameters: float32/64/16/bf16 on the CPU or CUDA."""
    ok = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    return bool(params) and all(p.dtype in ok and p.device.type in ("cpu", "cuda") for p in params)


def local_train(
    model: nn.Module,
    global_params: Params,
    tokens: torch.Tensor,
    cfg: LocalTraining,
    generator: torch.Generator,
) -> ClientResult:
    """Train ``model`` from ``global_params`` on ``tokens``; return the update."""
    set_params(model, global_params)
    model.train()
    device = model_device(model)
    x, y = make_windows(tokens, block_size(model))
    num_tokens = int((y >= 0).sum())
    x, y = x.to(device), y.to(device)
    opt = make_optimizer(model, cfg)

    def batches():
        while True:  # epochs of shuffled windows (the order drawn on the host generator)
            order = torch.randperm(x.size(0), generator=generator).to(device)
            for i in range(0, x.size(0), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                yield x[idx], y[idx]

    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * -(-x.size(0) // cfg.batch_size)
    losses, steps = [], 0
    if num_tokens > 0:
        for (bx, by), _ in zip(batches(), range(total_steps)):
            loss = lm_loss(model, bx, by)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # summed once at the end: no device sync per step
            steps += 1
    loss_sum = float(torch.stack(losses).double().sum()) if losses else 0.0
    return ClientResult(update=model_update(model, global_params), num_tokens=num_tokens,
                        loss_sum=loss_sum, steps=steps)


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, params: Params, tokens: list[torch.Tensor], batch_size: int = 64
) -> tuple[float, int, int]:
    """Summed next-token loss, correct predictions and predicted tokens over held-out streams.

    Each stream is windowed like training. Sums (not means) so that several
    holders of held-out text (federated evaluation) can be pooled exactly.
    """
    set_params(model, params)
    model.eval()
    xs, ys = zip(*(make_windows(t, block_size(model)) for t in tokens)) if tokens else ((), ())
    if not xs:
        return 0.0, 0, 0
    x, y = torch.cat(xs), torch.cat(ys)
    device = model_device(model)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, x.size(0), batch_size):
        bx, by = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = model(bx)
        mask = by >= 0
        loss_sum += float(
            F.cross_entropy(logits.view(-1, logits.size(-1)), by.view(-1), ignore_index=-1, reduction="sum")
        )
        correct += int((logits.argmax(-1) == by)[mask].sum())
        count += int(mask.sum())
    return loss_sum, correct, count


def evaluate(
    model: nn.Module, params: Params, tokens: list[torch.Tensor], batch_size: int = 64
) -> tuple[float, float, int]:
    """Mean next-token loss and accuracy over held-out token streams.

    Returns ``(loss, accuracy, num_tokens)``; each stream is windowed like training.
    """
    loss_sum, correct, count = evaluate_sums(model, params, tokens, batch_size)
    if count == 0:
        return float("nan"), float("nan"), 0
    return loss_sum / count, correct / count, count
