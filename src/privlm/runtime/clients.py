"""The clients of an in-process run, as every in-process executor trains them.

Shared by the sequential, thread, process and batched executors (none of which imports another):
the model on its device, each client's tokens, the evaluation clients, local-training
settings, and -- in example-level mode -- each silo's record windows for DP-SGD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from privlm.config import RunConfig
from privlm.data.corpus import FederatedCorpus, split_into_records
from privlm.engine.executor import Population
from privlm.errors import ConfigError, DataError
from privlm.federated.client import ClientResult, LocalTraining, evaluate
from privlm.federated.dp_sgd import record_windows
from privlm.mechanisms.base import Contribution
from privlm.mechanisms.silo import SiloDPSGD
from privlm.privacy.mechanism import NoiseSource
from privlm.runtime.training import eval_client_indices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiloData:
    """Example-level mode: one silo's records, one window each."""

    silo_id: str
    x: torch.Tensor
    y: torch.Tensor
    truncated: int  # records cut to block_size


class LocalClients:
    """A prepared corpus's clients, their tokens and the model they train (in this process)."""

    def __init__(self, cfg: RunConfig, corpus: FederatedCorpus, model: torch.nn.Module, tokenizer,
                 device: torch.device, local: LocalTraining, population: Population,
                 silo: SiloDPSGD | None = None) -> None:
        self.cfg, self.corpus, self.model, self.tokenizer = cfg, corpus, model, tokenizer
        self.device, self.local, self.population, self.silo = device, local, population, silo
        self.train_tokens = [tokenizer.encode(cl.train) for cl in corpus.clients]
        self.eval_clients = eval_client_indices(cfg.seed, corpus.num_clients, cfg.eval.max_clients)
        self.eval_tokens = [t for i in self.eval_clients
                            if (t := tokenizer.encode(corpus.clients[i].test)).numel() > 1]
        self.noise = NoiseSource(cfg.seed if cfg.privacy.seeded_noise else None)  # DP-SGD's, in silos
        self.silos = self._silo_data(silo) if silo is not None else {}

    def _silo_data(self, silo: SiloDPSGD) -> dict[int, SiloData]:
        bound = self.cfg.privacy.example.max_records
        block = self.model.cfg.block_size
        out = {}
        for i, cl in enumerate(self.corpus.clients):
            records = [self.tokenizer.encode(r) for r in split_into_records(cl.train, self.cfg.data.records)]
            x, y, truncated = record_windows(records, block)
            if x.size(0) == 0:
                raise DataError(f"silo {cl.client_id}: no training record of 2 or more tokens")
            if bound is not None and x.size(0) > bound:
                raise ConfigError(f"privacy.example.max_records: silo {cl.client_id} has more records than the "
                                  f"declared bound {bound}; raise the bound (delta depends on it)")
            if truncated:
                log.warning("silo %s: %d of %d records are longer than %d tokens and were truncated",
                            cl.client_id, truncated, x.size(0), block)
            out[i] = SiloData(cl.client_id, x, y, truncated)
        return out

    def client_id(self, i: int) -> str:
        return self.corpus.clients[i].client_id

    def evaluate(self, params) -> tuple[float, float]:
        loss, acc, _ = evaluate(self.model, params, self.eval_tokens, self.cfg.eval.batch_size)
        return loss, acc


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training draws dropout masks: an ``nn.Dropout`` with p > 0, or a Hugging Face
    config with a positive ``*dropout*`` rate (attention dropout is often functional)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        hf = getattr(m, "config", None)
        if hasattr(hf, "to_dict") and any("dropout" in k and isinstance(v, float) and v > 0
                                          for k, v in hf.to_dict().items()):
            return True
    return False


class LocalExecutor:
    """What the in-process executors share: their clients, population and evaluation."""

    deterministic = True

    def __init__(self, clients: LocalClients) -> None:
        self.clients = clients
        self.population: Population = clients.population

    def start(self, run_dir: Path) -> None:
        pass

    def close(self) -> None:
        pass

    def evaluate(self, params) -> tuple[float, float]:
        return self.clients.evaluate(params)


def user_contribution(res: ClientResult, cid: str) -> Contribution:
    return Contribution(client_id=cid, update=res.update, weight=float(res.num_tokens),
                        train_loss=res.loss_sum / res.steps if res.steps else None)
