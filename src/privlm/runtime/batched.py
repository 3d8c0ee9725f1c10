"""The batched executor: K clients' local training as one computation (``worker_kind = "batched"``).

The round's ids are taken in chunks of ``workers`` = K. A chunk's parameters and optimizer state
are stacked along a leading client axis (one flat ``[K, P]`` tensor each), and every local step
is one ``vmap(grad(functional_call(model)))`` over the K clients, each on a batch of its own
windows, in the order ``local_train`` draws them from the client's own generator. Clients differ
in their number of steps: one whose training has ended is masked (its parameters and optimizer
state no longer change). A batch shorter than ``batch_size`` is padded with rows whose targets are
ignored, so each client's loss is the mean over its own real targets, as in ``local_train``.

Updates are yielded in the order of ``ids``: the server sees the sequential stream, equal to it up
to float rounding (batched kernels reduce in another order), not to the bit. The last chunk is
padded with idle clients, so every step has the same shapes and a client's arithmetic does not
depend on how many others the round samples. Memory is O(K x model), never O(clients x model).
On a GPU this replaces K clients' kernel launches with one set; on the CPU it may gain nothing
(``benchmarks/batched_executor.py`` measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from privlm.config import RunConfig
from privlm.engine.executor import Reply, ServerView
from privlm.errors import ConfigError
from privlm.federated.client import ClientResult, LocalTraining, block_size, make_optimizer, make_windows
from privlm.runtime.clients import LocalClients, LocalExecutor, has_dropout, user_contribution
from privlm.runtime.training import client_generator, local_training

_OTHER = 'use worker_kind = "thread"'


def check_batched(cfg: RunConfig) -> None:
    """What ``worker_kind = "batched"`` cannot train, refused in one line naming the field."""
    if cfg.privacy.mode == "example":
        raise ConfigError('worker_kind: "batched" trains user-level and non-private clients; example-level '
                          'silos (DP-SGD) train one at a time: use worker_kind = "thread" with workers = 1')
    if cfg.model.kind == "hf":
        raise ConfigError('model.kind: "hf" is not supported by worker_kind = "batched" (Hugging Face and LoRA '
                          f"models are not verified under torch.func.vmap); {_OTHER}")
    if cfg.model.kind == "lstm":
        raise ConfigError('model.kind: "lstm" is not supported by worker_kind = "batched" (torch.func.vmap has '
                          f"no batching rule for the LSTM kernel: it would loop over the clients); {_OTHER}")
    if cfg.model.dropout > 0:
        raise ConfigError('model.dropout: worker_kind = "batched" needs dropout = 0 (masks would be drawn for '
                          f"the K clients at once, not from each client's own generator); {_OTHER}")


def batch_order(num_windows: int, local: LocalTraining, generator: torch.Generator) -> list[torch.Tensor]:
    """The windows of each of a client's local steps, drawn as ``local_train`` draws them:
    ``local.steps`` batches, or ``epochs`` passes, over a fresh permutation each pass."""
    if num_windows == 0:
        return []
    total = local.steps if local.steps is not None else local.epochs * -(-num_windows // local.batch_size)
    out: list[torch.Tensor] = []
    while len(out) < total:
        out += torch.randperm(num_windows, generator=generator).split(local.batch_size)
    return out[:total]


class BatchedExecutor(LocalExecutor):
    def __init__(self, clients: LocalClients, workers: int) -> None:
        super().__init__(clients)
        check_batched(clients.cfg)
        if has_dropout(clients.model):
            raise ConfigError(f'model.dropout: worker_kind = "batched" needs a model without dropout; {_OTHER}')
        self.workers = workers
        # On the CPU the batched kernels are deterministic (a client's update is the same to the bit
        # whichever clients share its chunk: tested); on CUDA that is not verified (some backward
        # kernels accumulate with atomics), so only under torch's deterministic algorithms.
        self.deterministic = clients.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()

    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        for start in range(0, len(ids), self.workers):
            chunk = ids[start : start + self.workers]
            for i, res in zip(chunk, self._train(view, chunk)):
                if on_client:
                    on_client()
                yield user_contribution(res, self.clients.client_id(i))

    def _train(self, view: ServerView, chunk: list[int]) -> list[ClientResult]:
        """Local training of the clients ``chunk`` (at most K) from ``view.params``, as one batch."""
        cl, k = self.clients, self.workers
        model, dev, local = cl.model, cl.device, local_training(cl.cfg, view.round)
        model.train()
        names = [n for n, _ in model.named_parameters() if n in view.params]
        shapes = [view.params[n].shape for n in names]
        sizes = [view.params[n].numel() for n in names]

        # Each client's windows and batch order; one padding row (ignored targets) for short batches.
        xs, ys, orders, num_tokens, offset = [], [], [], [], 0
        for i in chunk:
            gen = client_generator(cl.cfg, view.round - 1, cl.client_id(i))  # (seeds torch too, as sequentially)
            x, y = make_windows(cl.train_tokens[i], block_size(model))
            num_tokens.append(int((y >= 0).sum()))
            orders.append([b + offset for b in batch_order(x.size(0), local, gen)] if num_tokens[-1] else [])
            xs.append(x)
            ys.append(y)
            offset += x.size(0)
        steps = [len(o) for o in orders]
        xs.append(torch.zeros(1, block_size(model), dtype=torch.long))
        ys.append(torch.full((1, block_size(model)), -1, dtype=torch.long))
        all_x, all_y = torch.cat(xs).to(dev), torch.cat(ys).to(dev)
        num_steps = max(steps)
        index = torch.full((num_steps, k, local.batch_size), offset, dtype=torch.long)  # [step, client, row]
        for c, order in enumerate(orders):
            if order:  # [its steps, rows], a short last batch padded with the padding row
                rows = torch.nn.utils.rnn.pad_sequence(order, batch_first=True, padding_value=offset)
                index[: len(order), c, : rows.size(1)] = rows
        index = index.to(dev)
        active = (torch.arange(num_steps)[:, None] < torch.tensor(steps + [0] * (k - len(chunk)))).to(dev)

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, params, (x,))
            total = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
            return total / (y >= 0).sum().clamp(min=1)  # the mean over real targets (0 for an idle client)

        step_fn = vmap(grad_and_value(loss))
        flat = torch.cat([view.params[n].reshape(-1) for n in names]).to(dev).expand(k, -1).clone()  # [K, P]
        opt = _Optimizer(model, local, flat)
        losses = []
        # Attention by its composite (math) form: vmap batches it forward and backward, where the
        # fused kernels' backward has no batching rule (vmap would loop over the K clients).
        with sdpa_kernel(SDPBackend.MATH):
            for s in range(num_steps):
                params = dict(zip(names, (p.view(k, *shape) for p, shape in zip(flat.split(sizes, dim=1), shapes))))
                grads, value = step_fn(params, all_x[index[s]], all_y[index[s]])
                g = torch.cat([grads[n].reshape(k, -1) for n in names], dim=1)
                flat = opt.step(flat, g, active[s][:, None], s + 1)
                losses.append(value)
        loss_sums = torch.where(active, torch.stack(losses), 0).double().sum(0).tolist() if losses else [0.0] * k

        final = flat.cpu()
        results = []
        for c in range(len(chunk)):
            pieces = final[c].split(sizes)
            update = {n: p.view(shape) - view.params[n] for n, p, shape in zip(names, pieces, shapes)}
            results.append(ClientResult(update=update, num_tokens=num_tokens[c], loss_sum=loss_sums[c], steps=steps[c]))
        return results


class _Optimizer:
    """torch.optim's SGD or Adam (as ``make_optimizer`` builds it, with its defaults: Adam's betas,
    eps and any weight decay) on a ``[K, P]`` stack of clients; a client whose ``active`` is False
    keeps its parameters and state. The arithmetic is torch's ``foreach`` implementation's."""

    def __init__(self, model: torch.nn.Module, local: LocalTraining, flat: torch.Tensor) -> None:
        group = make_optimizer(model, local).param_groups[0]  # (only its settings are used)
        if any(group.get(key) for key in ("momentum", "nesterov", "amsgrad", "maximize", "decoupled_weight_decay")):
            raise ConfigError(f"client.optimizer: worker_kind = \"batched\" implements plain SGD and Adam; {_OTHER}")
        self.adam = local.optimizer == "adam"
        self.lr, self.weight_decay = group["lr"], group["weight_decay"]
        if self.adam:
            self.beta1, self.beta2 = group["betas"]
            self.eps = group["eps"]
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(flat), torch.zeros_like(flat)

    def step(self, p: torch.Tensor, g: torch.Tensor, active: torch.Tensor, t: int) -> torch.Tensor:
        """Parameters after step ``t`` (1-based; the same for every active client)."""
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        if not self.adam:
            return torch.where(active, p.add(g, alpha=-self.lr), p)
        m = torch.where(active, self.exp_avg.lerp(g, 1 - self.beta1), self.exp_avg)
        v = torch.where(active, self.exp_avg_sq.mul(self.beta2).addcmul(g, g, value=1 - self.beta2), self.exp_avg_sq)
        self.exp_avg, self.exp_avg_sq = m, v
        step_size = self.lr / (1 - self.beta1 ** t)
        denom = (v.sqrt() / (1 - self.beta2 ** t) ** 0.5).add(self.eps)
        return torch.where(active, p.addcdiv(m, denom, value=-step_size), p)
