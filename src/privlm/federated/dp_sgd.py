"""Example-level DP-SGD inside one silo (Opacus): the client side of ``privacy.mode = "example"``.

For federations of a few institutions, the unit to protect is one record (a
note, a line), and each silo runs DP-SGD over its own records. One step:

1. Poisson-sample the silo's records: each independently with probability q,
   from a generator keyed by the OS CSPRNG (or seeded, in tests);
2. per-record gradients of the trainable tensors with Opacus's
   ``GradSampleModule`` (hooks or functorch; never re-implemented here), or
   only their norms with Opacus's ghost clipping (two backward passes);
3. clip each record's gradient to L2 norm C over all trainable tensors
   together and sum (Opacus ``DPOptimizer.clip_and_accumulate``, or the
   ghost-clipping loss wrapper);
4. add ONE Gaussian draw N(0, (zC)^2) per coordinate to the sum, from
   privlm's noise source (Philox keyed with 128 CSPRNG bits, as for DP-FedAvg;
   Opacus's own secure mode needs torchcsprng), and divide by the expected
   batch size q*n (Opacus ``scale_grad``);
5. the local optimizer step.

Privacy: one step is ``PoissonSampled(q, Gaussian(z))`` on the silo's records;
a round of local training is that event self-composed ``steps`` times
(:meth:`privlm.mechanisms.silo.SiloDPSGD.event`). Empty Poisson batches are steps too (noise only).
A record is one example: it is cut to one window of ``block_size`` tokens
(longer records are truncated, never split, so one record never becomes two
examples).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from privlm.privacy.mechanism import CLIP_MARGIN
from privlm.federated.client import (ClientResult, LocalTraining, make_optimizer, model_device, model_update,
                                     set_params)

Params = dict[str, torch.Tensor]
GradSampleMode = Literal["hooks", "functorch", "ghost"]


@dataclass(frozen=True)
class ExampleDP:
    sampling_rate: float  # q: each record's chance of being in a step's batch
    noise_multiplier: float  # z
    clip_norm: float  # C, per record, L2 over all trainable tensors
    grad_sample_mode: GradSampleMode = "hooks"

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not (self.clip_norm > 0 and self.noise_multiplier >= 0):
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")


def steps_per_round(cfg: LocalTraining, dp: ExampleDP) -> int:
    """Local steps: ``local_steps``, or ``local_epochs`` passes of 1/q expected-size batches."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(1 / dp.sampling_rate)


def record_windows(records: list[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One (input, target) window per record; returns ``(x, y, truncated)``.

    Records with fewer than 2 tokens have no next-token target and are dropped.
    """
    kept = [r for r in records if r.numel() >= 2]
    x = torch.zeros(len(kept), block_size, dtype=torch.long)
    y = torch.full((len(kept), block_size), -1, dtype=torch.long)
    truncated = 0
    for i, r in enumerate(kept):
        n = min(r.numel() - 1, block_size)
        truncated += r.numel() - 1 > block_size
        x[i, :n] = r[:n]
        y[i, :n] = r[1 : n + 1]
    return x, y, truncated


def per_record_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each record's mean next-token loss, shape [records]."""
    logits = model(x)
    tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                          reduction="none").view(y.shape)
    counts = (y >= 0).sum(1).clamp(min=1)
    return tok.sum(1) / counts


def per_record_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over records of each record's mean next-token loss (Opacus ``loss_reduction="mean"``)."""
    return per_record_losses(model, x, y).mean()


@contextmanager
def _per_sample_grads(model: nn.Module, mode: GradSampleMode, clip_norm: float):
    """Opacus's GradSampleModule around ``model`` for the duration; hooks removed after."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    with warnings.catch_warnings():
        # Opacus's hooks on a model whose inputs (token ids) need no grad; functorch under autocast.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="In CPU autocast")
        if mode == "ghost":
            gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                       strict=False, max_grad_norm=clip_norm,
                                                       use_ghost_clipping=True)
        else:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False,
                                   force_functorch=mode == "functorch")
        try:
            yield gsm
        finally:
            gsm._close()  # remove hooks and grad_sample attributes from the shared model
            for m in model.modules():  # and what an exception mid-step could leave behind
                for attr in ("activations", "max_batch_len"):
                    if hasattr(m, attr):
                        delattr(m, attr)
            for p in model.parameters():
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
                p.grad = None


def _dp_optimizer(optimizer: torch.optim.Optimizer, dp: ExampleDP, expected_batch: int,
                  noise: np.random.Generator):
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    base = DPOptimizerFastGradientClipping if dp.grad_sample_mode == "ghost" else DPOptimizer

    class _Optimizer(base):  # type: ignore[valid-type,misc]
        """Opacus's DPOptimizer with privlm's noise source (float64 draw, CSPRNG key) and, for
        per-record gradients (hooks, functorch), privlm's clipping arithmetic: norms, factors and
        the sum in float64 with the margin of :func:`privlm.privacy.mechanism.clip_factor`, so a
        clipped record's gradient never exceeds C (Opacus's own factor C / (norm + 1e-6), in
        float32, can: ghost clipping keeps it)."""

        if dp.grad_sample_mode != "ghost":
            def clip_and_accumulate(self) -> None:
                samples = [self._get_flat_grad_sample(p) for p in self.params]
                n = len(samples[0]) if samples else 0
                norms = (torch.stack([g.reshape(n, -1).to(torch.float64).norm(2, dim=-1) for g in samples], 1)
                         .norm(2, dim=1) if n else torch.zeros(0, dtype=torch.float64))
                bound = self.max_grad_norm * (1 - CLIP_MARGIN)
                factor = torch.where(norms > bound, bound / norms.clamp(min=1e-300), torch.ones_like(norms))
                for p, g in zip(self.params, samples):
                    _check_processed_flag(p.grad_sample)
                    grad = torch.einsum("i,i...", factor.to(g.device), g.to(torch.float64))
                    p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                    _mark_as_processed(p.grad_sample)

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                z = torch.from_numpy(noise.standard_normal(tuple(p.summed_grad.shape))).to(p.summed_grad.device)
                p.grad = (p.summed_grad.to(torch.float64) + z * std).to(p.dtype).view_as(p)
                _mark_as_processed(p.summed_grad)

    return _Optimizer(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                      expected_batch_size=expected_batch, loss_reduction="mean")


def dp_sgd_train(
    model: nn.Module,
    global_params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LocalTraining,
    dp: ExampleDP,
    sampling: np.random.Generator,
    noise: np.random.Generator,
) -> tuple[ClientResult, int]:
    """DP-SGD on one silo's record windows from ``global_params``; returns (update, steps run)."""
    set_params(model, global_params)
    model.train()
    n = x.size(0)
    device = model_device(model)
    with _per_sample_grads(model, dp.grad_sample_mode, dp.clip_norm) as gsm:
        # The step's noised sum is divided by the configured batch size, a public constant
        # (not q*n, which would depend on the silo's data size).
        opt = _dp_optimizer(make_optimizer(model, cfg, fused=False), dp, cfg.batch_size, noise)
        steps = steps_per_round(cfg, dp)
        loss_sum, nonempty = 0.0, 0
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            idx = torch.from_numpy(np.flatnonzero(sampling.random(n) < dp.sampling_rate))
            if idx.numel():
                loss_sum += _clipped_backward(gsm, opt, x[idx].to(device), y[idx].to(device), dp.grad_sample_mode)
                nonempty += 1
            else:  # an empty Poisson batch is still a step: the sum is zero, the noise is not
                for p in opt.params:
                    if dp.grad_sample_mode == "ghost":
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.step()
    update = model_update(model, global_params)
    num = int((y >= 0).sum())
    return ClientResult(update=update, num_tokens=num, loss_sum=loss_sum, steps=nonempty or 1), steps


def _clipped_backward(gsm, opt, x: torch.Tensor, y: torch.Tensor, mode: GradSampleMode) -> float:
    """Backward pass leaving what ``opt.step`` needs: per-record grads, or (ghost) their clipped sum."""
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        losses = per_record_losses(gsm, x, y)
        DPTensorFastGradientClipping(gsm, opt, losses, "mean").backward()
        return float(losses.detach().mean())
    loss = per_record_loss(gsm, x, y)
    loss.backward()
    return loss.item()


def clipped_sum_of_record_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                clip_norm: float, mode: GradSampleMode = "hooks") -> Params:
    """Opacus's clipped, summed per-record gradients of one batch (no noise): for tests/audits."""
    with _per_sample_grads(model, mode, clip_norm) as gsm:
        dp = ExampleDP(1.0, 0.0, clip_norm, mode)
        opt = _dp_optimizer(make_optimizer(model, LocalTraining(lr=0.0, optimizer="sgd")), dp, x.size(0),
                            np.random.default_rng(0))
        opt.zero_grad(set_to_none=True)
        _clipped_backward(gsm, opt, x, y, mode)
        if mode == "ghost":  # the second backward pass left the clipped sum in .grad
            return {n: p.grad.detach().clone() for n, p in model.named_parameters()  # type: ignore[union-attr]
                    if p.requires_grad}
        opt.clip_and_accumulate()
        return {n: p.summed_grad.detach().to(p.dtype)  # type: ignore[attr-defined]  # (Opacus sets it)
                for n, p in model.named_parameters() if p.requires_grad}
