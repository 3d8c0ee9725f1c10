"""The notebook API: run a config, resume a run directory, read a run back.

``run`` dispatches on ``cfg.runtime``: in this process (the sequential, thread or process
executor, by ``workers`` and ``worker_kind``), or on Flower's simulation engine. Every path
runs the same :class:`~privlm.engine.rounds.Engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from privlm import build
from privlm.audit import AuditPlan, load_plan
from privlm.config import RunConfig
from privlm.data.corpus import FederatedCorpus
from privlm.engine.rounds import Engine, RunResult
from privlm.errors import ConfigError
from privlm.federated import dp_fedavg
from privlm.models.factory import build_model, from_checkpoint, to_checkpoint
from privlm.rundir import open_run_dir

__all__ = ["RunResult", "Simulation", "run", "resume", "result_from_run_dir", "build_model",
           "to_checkpoint", "from_checkpoint"]


class Simulation:
    """An in-process run: the engine over the executor that ``cfg.workers`` names.

    A thin handle for notebooks and tests: ``run`` is the engine's; the rest shows the
    pieces (``model``, ``algo``, ``corpus``, ``train_tokens``, ...).
    """

    def __init__(self, cfg: RunConfig, corpus: FederatedCorpus | None = None, progress: bool = False,
                 audit_plan: AuditPlan | None = None) -> None:
        self.engine: Engine
        self.engine, self.clients = build.in_process(cfg, corpus, progress, audit_plan)

    # -- the run --------------------------------------------------------------------
    def run(self, out: Path | None = None, progress: bool = True,
            stop_when: Callable[[dict], bool] | None = None, resume: bool = False) -> RunResult:
        return self.engine.run(out, progress, stop_when, resume)

    def contributions(self, state: dp_fedavg.ServerState, ids: list[int], on_client=None):
        """The sampled clients' contributions for the round after ``state`` (streamed)."""
        return self.engine.contributions(state, ids, on_client)

    def evaluate(self, params) -> tuple[float, float]:
        return self.engine.executor.evaluate(params)

    def close(self) -> None:
        self.engine.executor.close()

    # -- the pieces -----------------------------------------------------------------
    @property
    def cfg(self) -> RunConfig:
        return self.engine.cfg

    @property
    def algo(self) -> dp_fedavg.FedAvg:
        return self.engine.algo

    @property
    def executor(self):
        return self.engine.executor

    @property
    def replayable(self) -> bool:
        return self.engine.replayable

    @property
    def model(self):
        return self.clients.model

    @property
    def tokenizer(self):
        return self.clients.tokenizer

    @property
    def corpus(self) -> FederatedCorpus:
        return self.clients.corpus

    @property
    def train_tokens(self):
        return self.clients.train_tokens

    @property
    def local(self):
        return self.clients.local

    @property
    def device(self):
        return self.clients.device

    @property
    def silos(self):
        return self.clients.silos

    @property
    def scrub_counts(self):
        return self.engine.population.scrub_counts


def run(cfg: RunConfig, out: Path | None = None, progress: bool = True,
        corpus: FederatedCorpus | None = None) -> RunResult:
    """Run ``cfg`` and return its results.

    In process, or on Flower's simulation engine with ``runtime = "flower-simulation"``.
    """
    if cfg.runtime == "flower-simulation":
        if corpus is not None:
            raise ConfigError('runtime: "flower-simulation" reads the data on the nodes; pass no corpus')
        from privlm.runtime.flower.ray_simulation import run_flower_simulation

        return result_from_run_dir(run_flower_simulation(cfg, out, progress))
    return Simulation(cfg, corpus, progress).run(out, progress)


def resume(run_dir: Path, progress: bool = True, corpus: FederatedCorpus | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last durable state, with its own config.toml."""
    from privlm.config import load_config

    rd = open_run_dir(run_dir)
    cfg = load_config(rd.config_path, [])
    return Simulation(cfg, corpus, progress, load_plan(rd.path)).run(rd.path, progress, resume=True)


def result_from_run_dir(path: Path) -> RunResult:
    """The :class:`RunResult` of a finished run, read back from its directory."""
    rd = open_run_dir(path)
    rows = rd.read_metrics()
    record = rd.read_privacy()
    evals = [r for r in rows if r.get("eval_loss") is not None]
    return RunResult(
        run_dir=rd.path, rounds_completed=record["rounds_completed"], epsilon=record["epsilon"],
        delta=record["delta"], eval_loss=evals[-1]["eval_loss"] if evals else float("nan"),
        eval_accuracy=evals[-1]["eval_accuracy"] if evals else float("nan"), stopped=record.get("stopped"),
        metrics=rows, corpus_stats={"num_clients": record["num_clients"]}, population=record.get("population", ""),
    )
