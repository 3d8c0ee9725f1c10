"""The round engine: the order of a round, written once for every mechanism and executor.

    budget check -> ledger entry written durably -> sample -> executor: local training
    -> mechanism: validate/clip -> aggregator -> mechanism: noise, denominator
    -> server step -> metrics, checkpoint, resume state, privacy.json

The ledger entry is on disk before any parameter that it pays for exists, so a crash can
only over-count spent privacy, never under-count it. Who pays is the protocol's business
(:mod:`privlm.engine.protocols`: one central entry per round, or one per taking-part silo);
where updates come from is the executor's (:mod:`privlm.engine.executor`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privlm.audit import AuditPlan, save_plan, update_direction
from privlm.config import RunConfig
from privlm.console import progress_bar
from privlm.engine.accounts import Accounts, ResolvedPrivacy
from privlm.engine.executor import Dropout, Executor, ServerView
from privlm.engine.protocols import CentralPayment, SiloPayment
from privlm.engine.resume import load_for_resume
from privlm.errors import DataError
from privlm.faults import fault_point
from privlm.federated import dp_fedavg
from privlm.privacy.guarantee import ATTACK_LOG
from privlm.federated.client import get_params
from privlm.mechanisms.base import Contribution
from privlm.models.factory import to_checkpoint
from privlm.privacy.mechanism import NoiseSource
from privlm.rundir import RunDir, default_run_dir
from privlm.seeds import derived_seed, seed_torch
from privlm import tracking

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished (or budget-stopped) run reports."""

    run_dir: Path
    rounds_completed: int
    epsilon: float | None  # None for a non-private run
    delta: float | None
    eval_loss: float
    eval_accuracy: float
    stopped: str | None = None
    metrics: list[dict] = field(default_factory=list)
    corpus_stats: dict = field(default_factory=dict)
    population: str = ""  # who the N of the guarantee is


class Engine:
    """One run: a mechanism's rounds over an executor's clients, paid for in the ledger first."""

    def __init__(self, cfg: RunConfig, privacy: ResolvedPrivacy, algo: dp_fedavg.FedAvg, executor: Executor,
                 model: torch.nn.Module, audit_plan: AuditPlan | None = None) -> None:
        self.cfg, self.privacy, self.algo, self.executor, self.model = cfg, privacy, algo, executor, model
        self.audit_plan = audit_plan
        self.population = executor.population
        if algo.mechanism.mode != privacy.mode:
            raise ValueError(f"a {algo.mechanism.mode!r} mechanism cannot run a privacy.mode = {privacy.mode!r} run")
        self.noise = NoiseSource(cfg.seed if privacy.seeded_noise else None)
        silo_ids = list(self.population.client_ids)
        self.protocol = SiloPayment(self, silo_ids) if privacy.mode == "example" else CentralPayment(self)
        self.accounts = Accounts(privacy, cfg.federation.rounds, self.protocol.epsilon_of)
        self._ran = False

    @property
    def ledger(self):
        return self.accounts.ledger

    @property
    def replayable(self) -> bool:
        """Whether a round is a pure function of (state, round): seeded or non-private, on an
        executor that computes it deterministically."""
        return (self.privacy.seeded_noise or self.privacy.mode == "none") and self.executor.deterministic

    # -- privacy.json ------------------------------------------------------------
    def privacy_record(self, rounds_completed: int, stopped: str | None = None, exact: bool = True) -> dict:
        m = self.algo.mechanism
        fields = m.guarantee_fields()
        eps = self.accounts.epsilon() if (exact or not self.protocol.pending_allowed) else None
        return self.accounts.record(
            eps, noise_multiplier=fields["noise_multiplier"], clip_norm=fields["clip_norm"], sampling_rate=m.sampling_rate,
            num_clients=m.num_clients, clients_per_round=m.clients_per_round, rounds_completed=rounds_completed,
            stopped=stopped, population=self.population.description, pseudo_users=self.cfg.data.pseudo_users,
            runtime=self.population.runtime, adaptive_clipping=fields["adaptive_clipping"],
            matrix_factorization=fields.get("matrix_factorization"),
            silos=self.protocol.silos_record(),
            also_not_covered=[*tracking.not_covered(self.cfg), *([ATTACK_LOG] if self.cfg.attack.kind != "none" else [])])

    def write_privacy(self, rd: RunDir, rounds_completed: int, exact: bool = True,
                      stopped: str | None = None) -> dict:
        return self.accounts.write(rd, self.privacy_record(rounds_completed, stopped, exact))

    def epsilon_due(self, round_index: int) -> bool:
        """Whether round ``round_index`` releases a checkpoint, so privacy.json states the exact epsilon.

        Between checkpoints privacy.json holds the durable ledger and says its epsilon is pending
        (within the budget, by the budget check); computing it every round would cost more than
        the round at many rounds and small q (benchmarks/accounting.py).
        """
        c = self.cfg
        return round_index % c.output.checkpoint_every == 0 or round_index == c.federation.rounds

    # -- the run ---------------------------------------------------------------------
    def run(self, out: Path | None = None, progress: bool = True,
            stop_when: Callable[[dict], bool] | None = None, resume: bool = False) -> RunResult:
        """Run all rounds (or until the budget stop, or ``stop_when(metrics_row)`` is true).

        With ``resume=True``, ``out`` is an existing run directory: the run continues after
        its last completed round (:func:`privlm.engine.resume.load_for_resume`).
        """
        if self._ran:  # its accounts hold that run's ledger: a second run would replay it unpaid
            raise ValueError("this engine has run; build a new one for another run")
        self._ran = True
        rd = RunDir(out or self.cfg.output.dir or default_run_dir())
        tracking.check_available(self.cfg)
        if not resume:
            rd.check_new()  # before anything is written there
        rd.lock()  # one live run per directory; released by the kernel if we die
        try:
            state, metrics = load_for_resume(self, rd) if resume else self.start(rd)
            trackers = tracking.Trackers.open(self.cfg, rd.path, resume)  # (a bad store: before any round is paid)
            self.executor.start(rd.path)  # before any round is paid: a worker that cannot start costs no budget
            return self._loop(rd, state, metrics, progress, stop_when, trackers)
        finally:
            self.executor.close()
            rd.unlock()

    def start(self, rd: RunDir, restart: bool = False) -> tuple[dp_fedavg.ServerState, list[dict]]:
        if not restart:
            rd.create()
        rd.write_config(self.cfg.to_toml())
        if self.audit_plan is not None:
            save_plan(rd.path, self.audit_plan)
        if (scrub := self.population.scrub_counts) is not None:
            s = self.cfg.data.scrub
            rd.write_scrub({"operator": s.operator, "counts": scrub,
                            "detector": f"spacy:{s.spacy_model}" if s.spacy_model else "patterns",
                            "clients": self.population.num_clients})
        self.write_privacy(rd, 0)  # privacy.json (empty ledger) first: a state file without it cannot exist
        state = dp_fedavg.init(self.algo, get_params(self.model))
        if (save_adapter := getattr(self.model, "save_adapter_config", None)) is not None:
            save_adapter(rd.path / "checkpoints")  # (LoRA: peft's adapter_config.json)
        self.checkpoint(rd, 0, state.params)
        self.save_state(rd, state)
        return state, []

    def checkpoint(self, rd: RunDir, round_index: int, params: dict) -> None:
        rd.save_checkpoint(round_index, to_checkpoint(self.model, params))

    def save_state(self, rd: RunDir, state: dp_fedavg.ServerState) -> None:
        rd.save_state(state.round, state.params, state.opt_state, len(self.ledger), state.mechanism,
                      self.ledger.digest())

    def contributions(self, state: dp_fedavg.ServerState, ids: list[int], on_client=None
                      ) -> Iterator[Contribution | Dropout]:
        """The executor's stream for the sampled ``ids``, then the audit's update canaries."""
        view = ServerView(state.params, state.round + 1, self.algo.mechanism.clip_norm(state.mechanism))
        yield from self.executor.contributions(view, ids, on_client)
        yield from self._update_canaries(view)

    def _update_canaries(self, view: ServerView) -> Iterator[Contribution]:
        """The audit's included white-box canaries, each Poisson-sampled with q like any user.

        A canary's update is C times its secret unit direction: one more user, so the
        mechanism's sensitivity and the ledger are unchanged; it goes through the same
        validation, clipping and noise as every client update.
        """
        plan = self.audit_plan
        if plan is None or not plan.update_included:
            return
        r = view.round
        seed = derived_seed(self.cfg.seed, "audit-canary-sampling", r) if self.replayable else secrets.randbits(128)
        draws = np.random.default_rng(seed).random(len(plan.update_included))
        shapes = {k: v.shape for k, v in view.params.items()}
        for k, included in enumerate(plan.update_included):
            if included and draws[k] < self.algo.sampling_rate:
                direction = update_direction(plan, k, shapes)
                assert view.clip_norm is not None  # (update canaries need user-level DP)
                update = {name: (t * view.clip_norm).to(view.params[name].dtype) for name, t in direction.items()}
                yield Contribution(f"audit-canary-{k}", update, 1.0, None)

    def _loop(self, rd: RunDir, state: dp_fedavg.ServerState, metrics: list[dict], progress: bool,
              stop_when: Callable[[dict], bool] | None, trackers: tracking.Trackers | None = None) -> RunResult:
        trackers = trackers or tracking.Trackers([])
        c = self.cfg
        if self.privacy.seeded_noise and self.privacy.mode != "none":
            log.warning("privacy.seeded_noise = true: noise is NOT secure; the guarantee does not hold")
        stopped = None
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        eval_loss = evals[-1]["eval_loss"] if evals else float("nan")
        eval_acc = evals[-1]["eval_accuracy"] if evals else float("nan")
        bar = progress_bar(progress)
        with bar or nullcontext():
            rounds_task = bar.add_task("rounds", total=c.federation.rounds, completed=state.round) if bar else None
            clients_task = bar.add_task("clients", total=None) if bar else None
            for r in range(state.round + 1, c.federation.rounds + 1):
                t0 = time.perf_counter()
                if self.replayable:  # e.g. dropout: make the round a function of (state, r)
                    seed_torch(derived_seed(c.seed, "torch", r))
                # 1. Budget check, then the round's privacy cost, durable before anything else;
                #    then who takes part (after the entry is durable).
                ids, eps, stopped = self.protocol.pay(rd, r, state)
                if stopped:
                    break
                fault_point("ledger-written", r)
                # 2. Train, validate/clip/aggregate, noise, server step.
                if bar:
                    bar.reset(clients_task, total=len(ids))
                advance = (lambda: bar.advance(clients_task)) if bar else None
                dropped = [0]
                state, stats = dp_fedavg.apply(
                    self.algo, state, _count_dropouts(self.contributions(state, ids, advance), dropped),
                    self.noise.generator(r) if self.algo.private else None,  # example: noise is in DP-SGD
                )
                fault_point("aggregated", r)
                bad = next((k for k, v in state.params.items() if not bool(torch.isfinite(v).all())), None)
                if bad is not None:  # never released: no checkpoint, state or metrics of this round
                    raise DataError(f"round {r}: the global model became non-finite ({bad!r} holds NaN or Inf); "
                                    "nothing of this round was saved, and its ledger entry stays counted. "
                                    "Lower client.lr or server.lr, or check privacy.clip_norm")
                # 3. Release: metrics, checkpoint, resume state, privacy.json with the completed count.
                evaluated = r % c.eval.every == 0 or r == c.federation.rounds
                if evaluated:
                    eval_loss, eval_acc = self.executor.evaluate(state.params)
                row = {
                    "round": r,
                    "train_loss": _num(stats.train_loss),
                    "eval_loss": _num(eval_loss) if evaluated else None,
                    "eval_accuracy": _num(eval_acc) if evaluated else None,
                    "epsilon": eps,
                    "clients": stats.clients,
                    "sampled": len(ids),
                    "rejected": stats.rejected,
                    "dropped": dropped[0],
                    "clipped": stats.clipped,
                    "clip_norm": stats.clip_norm,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
                metrics.append(row)
                rd.write_metrics(metrics)
                fault_point("metrics-written", r)
                if r % c.output.checkpoint_every == 0 or r == c.federation.rounds:
                    self.checkpoint(rd, r, state.params)
                    fault_point("checkpoint-written", r)
                self.save_state(rd, state)
                fault_point("state-written", r)
                if eps is not None or not self.protocol.pending_allowed:  # (else: next round's write)
                    self.write_privacy(rd, r, exact=True)
                trackers.log_round(row)  # (after the round is durable: a re-run round is logged once)
                if stop_when is not None and stop_when(row):
                    if r % c.output.checkpoint_every and r != c.federation.rounds:
                        self.checkpoint(rd, r, state.params)
                    break
                if bar:
                    shown = self.accounts.known_epsilon
                    bar.update(rounds_task, advance=1,
                               description=f"rounds (acc {eval_acc:.3f}" + (f", eps {shown:.2f})" if shown else ")"))
        completed = state.round
        if stopped:
            log.warning(stopped)
            if completed and completed % c.output.checkpoint_every:
                self.checkpoint(rd, completed, state.params)
        if completed and (math.isnan(eval_loss) or (metrics and metrics[-1]["eval_loss"] is None)):
            eval_loss, eval_acc = self.executor.evaluate(state.params)
        record = self.write_privacy(rd, completed, stopped=stopped)
        trackers.finish(record)
        from privlm.report.html import write_report

        write_report(rd)
        return RunResult(
            run_dir=rd.path, rounds_completed=completed, epsilon=record["epsilon"],
            delta=record["delta"], eval_loss=eval_loss, eval_accuracy=eval_acc, stopped=stopped,
            metrics=metrics, corpus_stats=self.population.stats, population=self.population.description,
        )


def _count_dropouts(stream: Iterator[Contribution | Dropout], dropped: list[int]) -> Iterator[Contribution]:
    for item in stream:
        if isinstance(item, Dropout):
            dropped[0] += 1
        else:
            yield item


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)
