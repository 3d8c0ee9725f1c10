"""In-process simulation: the embedded default runtime.

All clients live in this process; each sampled client trains in turn on the
one model instance and its update is folded into the server's running sum at
once, so memory stays O(model) however many clients a round samples.

The order of one round (see DESIGN.md):

    budget check -> ledger entry written durably -> sample -> local training
    -> validate/clip/sum -> noise -> server step -> metrics/checkpoint

The ledger entry is on disk before any parameter that it pays for exists, so
a crash can only over-count spent privacy, never under-count it.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privlm.config import RunConfig
import privlm.data as _data
from privlm.data.corpus import FederatedCorpus, group_into_silos, split_into_pseudo_users, split_into_records
from privlm.errors import ConfigError, DataError
from privlm.federated import dp_fedavg
from privlm.federated.dp_fedavg import AdaptiveClipping
from privlm.data.scrub import scrub_corpus, settings_for_run
from privlm.audit import AuditPlan, apply_plan, draw_plan, load_plan, save_plan, update_direction
from privlm.federated.client import ClientResult, LocalTraining, evaluate, get_params, local_train
from privlm.federated.dp_sgd import ExampleDP, dp_sgd_train, record_windows, silo_round_event, steps_per_round
from privlm.federated.server_opt import ServerOptimizer
from privlm.runtime.training import (build_model, client_generator, derived_seed, from_checkpoint,
                                     resolve_device, seed_torch, threads_per_worker, to_checkpoint)
from privlm.runtime.workers import ProcessWorkers, remove_stale_token_files
from privlm.privacy.accountant import (
    BudgetCheck,
    accounting_problem,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
    round_event,
)
from privlm.privacy.guarantee import guarantee_record, weak_delta_warning
from privlm.privacy.ledger import Ledger
from privlm.privacy.mechanism import NoiseSource
from privlm.rundir import RunDir, default_run_dir, open_run_dir
from privlm.faults import fault_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiloPlan:
    """Example-level mode: one silo's records (one window each) and its DP-SGD mechanism."""

    silo_id: str
    x: torch.Tensor
    y: torch.Tensor
    dp: ExampleDP
    steps: int  # DP-SGD steps per round
    truncated: int  # records cut to block_size


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


def adaptive_clipping(cfg: RunConfig) -> AdaptiveClipping | None:
    """The adaptive-clipping settings of a (resolved) user-level config, or None."""
    p = cfg.privacy
    if not p.adaptive_clipping:
        return None
    stddev = p.clipped_count_stddev if p.clipped_count_stddev is not None else cfg.federation.clients_per_round / 20
    return AdaptiveClipping(p.target_quantile, p.clip_learning_rate, stddev)


def resolve_privacy(cfg: RunConfig, num_clients: int) -> RunConfig:
    """Fill in delta and (by calibration) the noise multiplier; check feasibility."""
    p = cfg.privacy
    if cfg.federation.clients_per_round > num_clients:
        raise ConfigError(
            f"federation.clients_per_round: {cfg.federation.clients_per_round} exceeds the "
            f"{num_clients} clients of the data"
        )
    if p.mode != "user":  # "none"; "example" is resolved per silo (Simulation._plan_silos)
        return cfg
    delta = p.delta if p.delta is not None else default_delta(num_clients)
    if delta >= 1.0 / num_clients:
        raise ConfigError(f"privacy.delta: {delta:g} must be below 1/N = {1 / num_clients:g}")
    if (weak := weak_delta_warning(delta, "clients")) is not None:
        log.warning(weak)
    q = cfg.federation.clients_per_round / num_clients
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        if (problem := accounting_problem(q, 1.0, cfg.federation.rounds)) is not None:
            raise ConfigError(f"federation.rounds: {problem[1]}")
        try:
            z = calibrate_noise_multiplier(p.target_epsilon, q, cfg.federation.rounds, delta, p.accountant)
        except ValueError as e:
            raise ConfigError(f"privacy.target_epsilon: {p.target_epsilon:g} cannot be met: {e}") from None
    if (problem := accounting_problem(q, z, cfg.federation.rounds)) is not None:
        key = "privacy.noise_multiplier" if problem[0] == "noise_multiplier" else "federation.rounds"
        raise ConfigError(f"{key}: {problem[1]}")
    budget = p.budget
    if budget is not None:
        one = epsilon_for([round_event(q, z)], delta, p.accountant)
        if one > budget:
            key = "privacy.max_epsilon" if p.max_epsilon is not None else "privacy.target_epsilon"
            raise ConfigError(f"{key}: budget {budget:g} is below the cost of a single round "
                              f"(epsilon {one:.3g} at z={z:.4g}, q={q:.4g}); raise it or the noise")
    new = cfg.model_copy(deep=True)
    new.privacy.delta = delta
    new.privacy.noise_multiplier = z
    if (adaptive := adaptive_clipping(new)) is not None:
        new.privacy.clipped_count_stddev = adaptive.count_stddev
        try:
            adaptive.update_noise_multiplier(z)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return new


def _has_dropout(model: torch.nn.Module) -> bool:
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


def _sampling_rng(cfg: RunConfig, round_index: int) -> np.random.Generator:
    """Which clients take part: secret under user-level DP (the sampling is part of the mechanism);
    in example-level mode the silos' participation is not what DP protects."""
    if cfg.privacy.seeded_noise or cfg.privacy.mode != "user":
        return np.random.default_rng([cfg.seed, round_index, 1])
    return np.random.default_rng(secrets.randbits(128))


class Simulation:
    """One run of (DP-)FedAvg over a corpus, in this process."""

    runtime_kind = "in-process"  # where the clients' data lives; a resume must match it

    def __init__(self, cfg: RunConfig, corpus: FederatedCorpus | None = None, progress: bool = False,
                 audit_plan: AuditPlan | None = None) -> None:
        self.corpus, self.scrub_counts, self.audit_plan = self._prepare_corpus(cfg, corpus, progress, audit_plan)
        self.cfg = resolve_privacy(cfg, self.corpus.num_clients)
        c = self.cfg
        torch.manual_seed(c.seed)
        self.model, tok = build_model(c)
        self.device = resolve_device(c)  # local training and evaluation; server state stays on the host
        self.model.to(self.device)
        self._replicas: list[torch.nn.Module] = []  # workers > 1: one model copy per training thread
        self._pool: ProcessWorkers | None = None  # worker_kind = "process": started by run()
        self.workdir: Path | None = None  # the run directory (run() sets it): worker processes' token files
        threads = c.workers > 1 and c.worker_kind == "thread"
        if c.workers > 1 and c.worker_kind == "process" and self.device.type != "cpu":
            raise ConfigError(f"worker_kind: \"process\" trains on the CPU, but device is {c.device!r}; "
                              "use worker_kind = \"thread\" on a GPU")
        # Dropout draws from torch's one global generator; with clients in parallel threads the
        # order of draws, and so the masks, depend on timing: such a run is not reproducible.
        # (A worker process seeds its own generator for each client, as workers = 1 does.)
        self._racing_dropout = threads and _has_dropout(self.model)
        if self._racing_dropout:
            log.warning("workers = %d with dropout: dropout masks depend on thread timing, so this "
                        "run is not bit-reproducible (a resumed round is paid for again)", c.workers)
        if threads and self.device.type == "cpu":
            # W clients at once, each with cpus // W threads per op: small models gain more
            # from that than from intra-op threads (benchmarks/RESULTS.md, issue #3)
            torch.set_num_threads(threads_per_worker(c.workers))
        self.tokenizer = tok
        self.train_tokens = [tok.encode(cl.train) for cl in self.corpus.clients]
        rng = np.random.default_rng([c.seed, 0, 2])
        order = rng.permutation(self.corpus.num_clients)
        if c.eval.max_clients is not None:
            order = order[: c.eval.max_clients]
        self.eval_clients = sorted(order.tolist())  # whose held-out text scores the model
        self.eval_tokens = [t for i in self.eval_clients if (t := tok.encode(self.corpus.clients[i].test)).numel() > 1]
        self.algo = dp_fedavg.DPFedAvg(
            num_clients=self.corpus.num_clients,
            clients_per_round=c.federation.clients_per_round,
            mode="none" if c.privacy.mode == "example" else c.privacy.mode,  # example: plain server mean
            clip_norm=c.privacy.clip_norm,
            noise_multiplier=c.privacy.noise_multiplier or 0.0,
            server_optimizer=ServerOptimizer(c.server.optimizer, c.server.lr, c.server.beta1,
                                             c.server.beta2, c.server.tau),
            adaptive=adaptive_clipping(c),
        )
        self.local = LocalTraining(c.client.local_epochs, c.client.local_steps, c.client.batch_size,
                                   c.client.lr, c.client.optimizer)
        self.noise = NoiseSource(c.seed if c.privacy.seeded_noise else None)
        self.ledger = Ledger()
        # epsilon_for(self.ledger) when it held _eps_entries entries (current_epsilon() brings it
        # up to date). Example-level mode: the largest of the silos' epsilons (silo_epsilon).
        self._eps_entries = 0
        self._budget_check: tuple[int, BudgetCheck] | None = None  # (ledger length it starts at, check)
        self.example = c.privacy.mode == "example"
        if self.example and c.workers > 1:
            raise ConfigError("workers: example-level silos (DP-SGD with Opacus) train one at a time; "
                              "set workers = 1")
        self.epsilon = 0.0 if (self.algo.private or self.example) else math.inf
        self.silos: dict[int, SiloPlan] = self._plan_silos() if self.example else {}
        self.silo_epsilon: dict[str, float] = {s.silo_id: 0.0 for s in self.silos.values()}
        self.silo_stopped: dict[str, str] = {}
        self.population = f"the {self.corpus.num_clients} clients of the data (in-process simulation)"
        if c.data.pseudo_users is not None:
            # What that means for a real client is said once, in the guarantee text.
            self.population = (f"the {self.corpus.num_clients} pseudo-users made by cutting each of the "
                               f"{self.corpus.info['real_clients']} clients' lines into {c.data.pseudo_users} "
                               "parts (in-process simulation)")

    def _prepare_corpus(self, cfg: RunConfig, corpus: FederatedCorpus | None, progress: bool,
                        audit_plan: AuditPlan | None) -> tuple[FederatedCorpus, dict[str, int] | None, AuditPlan | None]:
        """The population as the server sees it: loaded, scrubbed on each client, canaries in, silos merged."""
        corpus = corpus if corpus is not None else _data.load_corpus(
            cfg.data.source, cfg.data.path, cfg.data.num_clients, cfg.seed
        )
        scrub_counts: dict[str, int] | None = None
        settings = settings_for_run(cfg)
        if settings is not None:  # on each client, before anything reads its text
            corpus, scrub_counts = scrub_corpus(corpus, settings, progress)
        # The audit's canaries go in after scrubbing (they test DP, not the scrubber); held-out
        # clients leave the federation. A resumed run passes the plan it saved.
        if audit_plan is None and (cfg.audit.canaries > 0 or cfg.audit.update_canaries > 0):
            a = cfg.audit
            audit_plan = draw_plan([c.client_id for c in corpus.clients], a.canaries, a.canary_format,
                                   a.secret_digits, a.canary_repeats, a.holdout_fraction,
                                   cfg.seed if cfg.privacy.seeded_noise else None, a.update_canaries)
        if audit_plan is not None:
            if cfg.audit.canaries == 0 and cfg.audit.update_canaries == 0:
                raise DataError("audit/canaries.json: a canary plan, but config.toml plants no canaries; "
                                "refusing files this run did not write")
            if audit_plan.update_included and cfg.privacy.mode != "user":
                raise ConfigError("audit.update_canaries: white-box canaries audit user-level DP "
                                  "(privacy.mode = \"user\"); set it to 0")
            corpus = apply_plan(corpus, audit_plan)
        if cfg.data.silos is not None:
            try:
                corpus = group_into_silos(corpus, cfg.data.silos)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if cfg.data.pseudo_users is not None:
            if audit_plan is not None:
                raise ConfigError("data.pseudo_users: an audit plants canaries per client; "
                                  "set audit.canaries = 0 and audit.update_canaries = 0")
            corpus = split_into_pseudo_users(corpus, cfg.data.pseudo_users)
        return corpus, scrub_counts, audit_plan

    def _plan_silos(self) -> dict[int, SiloPlan]:
        """Example-level mode: each silo's records, and its DP-SGD mechanism fixed up front.

        The mechanism is a function of public settings only: q is
        ``privacy.example.sampling_rate`` (or ``client.batch_size / max_records``), the
        steps per round follow from q and ``client`` settings, z is calibrated from those,
        and delta defaults to ``max_records ** -1.1`` for ``privacy.example.max_records``,
        the declared public bound on records per silo. A silo's actual record count never
        enters the mechanism or privacy.json: with it, one record more or less would show.
        """
        c, p = self.cfg, self.cfg.privacy
        bound = p.example.max_records
        q = p.example.sampling_rate
        if q is None and bound is None:
            raise ConfigError("privacy.example.sampling_rate: set it, or privacy.example.max_records (a public "
                              "upper bound on records per silo; q is then client.batch_size / max_records): "
                              "the mechanism must not depend on a silo's private record count")
        if p.delta is None and bound is None:
            raise ConfigError("privacy.example.max_records: needed for the default delta (max_records^-1.1); "
                              "set it (a public upper bound on records per silo) or set privacy.delta")
        if q is None:
            q = min(1.0, c.client.batch_size / bound)
        delta = p.delta if p.delta is not None else default_delta(bound)
        if bound is not None and delta >= 1.0 / bound:
            raise ConfigError(f"privacy.delta: {delta:g} must be below 1/max_records = {1 / bound:g}")
        if (weak := weak_delta_warning(delta, "records per silo")) is not None:
            log.warning(weak)
        self.cfg.privacy.delta = delta
        steps = steps_per_round(self.local, ExampleDP(q, 0.0, p.clip_norm))
        z = p.noise_multiplier
        if z is None:
            z = calibrate_noise_multiplier(p.target_epsilon, q, c.federation.rounds * steps, delta, p.accountant)
        dp = ExampleDP(q, z, p.clip_norm, p.example.grad_sample_mode)
        one = epsilon_for([silo_round_event(dp, steps)], delta, p.accountant)
        if p.budget is not None and one > p.budget:
            raise ConfigError(f"privacy.target_epsilon: budget {p.budget:g} is below one round's cost "
                              f"(epsilon {one:.3g}: {steps} steps at q={q:.3g}, z={z:.3g})")
        plans = {}
        for i, cl in enumerate(self.corpus.clients):
            records = [self.tokenizer.encode(r) for r in split_into_records(cl.train, c.data.records)]
            x, y, truncated = record_windows(records, self.model.cfg.block_size)
            if x.size(0) == 0:
                raise DataError(f"silo {cl.client_id}: no training record of 2 or more tokens")
            if bound is not None and x.size(0) > bound:
                raise ConfigError(f"privacy.example.max_records: silo {cl.client_id} has more records than the "
                                  f"declared bound {bound}; raise the bound (delta depends on it)")
            if truncated:
                log.warning("silo %s: %d of %d records are longer than %d tokens and were truncated",
                            cl.client_id, truncated, x.size(0), self.model.cfg.block_size)
            plans[i] = SiloPlan(cl.client_id, x, y, dp, steps, truncated)
        return plans

    # -- pieces --------------------------------------------------------------
    def contributions(self, state: dp_fedavg.ServerState, ids: list[int], on_client=None
                      ) -> Iterator[dp_fedavg.Contribution]:
        """Local training of each sampled client, yielded one at a time (streamed)."""
        if self.cfg.workers > 1:  # user-level or non-private (example mode refuses workers)
            if self.cfg.worker_kind == "process":
                yield from self._process_contributions(state, ids, on_client)
            else:
                yield from self._parallel_contributions(state, ids, on_client)
            yield from self._update_canaries(state)
            return
        for i in ids:
            cid = self.corpus.clients[i].client_id
            if self.example:  # DP-SGD over the silo's records; all silos weigh the same
                plan = self.silos[i]
                res, _ = dp_sgd_train(self.model, state.params, plan.x, plan.y, self.local, plan.dp,
                                      self._silo_rng(state.round + 1, cid), self.noise.generator(
                                          state.round + 1, stream=f"noise:{cid}"))
                if on_client:
                    on_client()
                yield dp_fedavg.Contribution(cid, res.update, 1.0, res.loss_sum / res.steps)
                continue
            res = local_train(self.model, state.params, self.train_tokens[i], self.local,
                              client_generator(self.cfg, state.round, cid))
            if on_client:
                on_client()
            yield self._user_contribution(res, cid)
        yield from self._update_canaries(state)

    def _user_contribution(self, res: ClientResult, cid: str) -> dp_fedavg.Contribution:
        return dp_fedavg.Contribution(client_id=cid, update=res.update, weight=float(res.num_tokens),
                                      train_loss=res.loss_sum / res.steps if res.steps else None)

    def _parallel_contributions(self, state: dp_fedavg.ServerState, ids: list[int], on_client=None
                                ) -> Iterator[dp_fedavg.Contribution]:
        """``workers`` clients train at once, each thread on its own model replica.

        Each client's training is the same function on the same inputs as in the
        sequential loop (its own generator, the global params), and the updates
        are yielded in the order of ``ids``, so the server sees exactly the
        sequential stream. At most 2 x workers updates are held at once: memory
        is O(workers x model), never O(clients x model).
        """
        w = self.cfg.workers
        if len(self._replicas) < w:
            self._replicas += [copy.deepcopy(self.model) for _ in range(w - len(self._replicas))]
        free: queue.SimpleQueue = queue.SimpleQueue()
        for m in self._replicas[:w]:
            free.put(m)

        def train(i: int, gen: torch.Generator):
            model = free.get()
            try:
                return local_train(model, state.params, self.train_tokens[i], self.local, gen)
            finally:
                free.put(model)

        pool = ThreadPoolExecutor(max_workers=w, thread_name_prefix="privlm-client")
        pending: deque = deque()  # (client id, future), in the order of ids
        try:
            for n, i in enumerate(ids, 1):
                cid = self.corpus.clients[i].client_id
                pending.append((cid, pool.submit(train, i, client_generator(self.cfg, state.round, cid))))
                while pending and (len(pending) >= 2 * w or n == len(ids)):
                    cid0, fut = pending.popleft()
                    res = fut.result()
                    if on_client:
                        on_client()
                    yield self._user_contribution(res, cid0)
        finally:  # also when the consumer stops early (a rejected round, a crash): no stray work
            pool.shutdown(wait=True, cancel_futures=True)

    def _process_contributions(self, state: dp_fedavg.ServerState, ids: list[int], on_client=None
                               ) -> Iterator[dp_fedavg.Contribution]:
        """``workers`` clients train at once in worker processes (``privlm.runtime.workers``).

        Each process trains with the same ``local_train`` and per-client generator as the
        sequential loop, and the updates come back in the order of ``ids``.
        """
        self._start_workers()
        tasks = [(self.corpus.clients[i].client_id, i) for i in ids]
        stream = self._pool.train(state.params, state.round, tasks)
        try:
            for cid, res in stream:
                if on_client:
                    on_client()
                yield self._user_contribution(res, cid)
        finally:
            stream.close()  # now, not whenever the generator is collected

    def _start_workers(self) -> None:
        """Start the worker processes (``worker_kind = "process"``), or new ones after an error."""
        if self.cfg.workers > 1 and self.cfg.worker_kind == "process":  # (example mode refuses workers)
            if self._pool is not None and self._pool.broken:
                self.close()
            if self._pool is None:
                if self.workdir is None:
                    raise ValueError("worker processes need the run directory (Simulation.workdir) for "
                                     "the clients' token files")
                self._pool = ProcessWorkers(self.cfg, self.cfg.workers, self.train_tokens, self.workdir)

    def close(self) -> None:
        """Stop the worker processes, if any (``run`` does this when it returns or fails)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _update_canaries(self, state: dp_fedavg.ServerState) -> Iterator[dp_fedavg.Contribution]:
        """The audit's included white-box canaries, each Poisson-sampled with q like any user.

        A canary's update is C times its secret unit direction: one more user, so the
        mechanism's sensitivity and the ledger are unchanged; it goes through the same
        validation, clipping and noise as every client update.
        """
        plan = self.audit_plan
        if plan is None or not plan.update_included:
            return
        r = state.round + 1
        seed = derived_seed(self.cfg.seed, "audit-canary-sampling", r) if self.replayable else secrets.randbits(128)
        draws = np.random.default_rng(seed).random(len(plan.update_included))
        shapes = {k: v.shape for k, v in state.params.items()}
        for k, included in enumerate(plan.update_included):
            if included and draws[k] < self.algo.sampling_rate:
                direction = update_direction(plan, k, shapes)
                update = {name: (t * state.clip_norm).to(state.params[name].dtype) for name, t in direction.items()}
                yield dp_fedavg.Contribution(f"audit-canary-{k}", update, 1.0, None)

    def _silo_rng(self, round_index: int, silo_id: str) -> np.random.Generator:
        """The Poisson sampling of a silo's records: part of the DP-SGD mechanism, so secret."""
        if self.cfg.privacy.seeded_noise:
            return np.random.default_rng(derived_seed(self.cfg.seed, f"records:{round_index}", silo_id))
        return np.random.Generator(np.random.Philox(key=secrets.randbits(128)))

    def evaluate(self, params) -> tuple[float, float]:
        loss, acc, _ = evaluate(self.model, params, self.eval_tokens, self.cfg.eval.batch_size)
        return loss, acc

    def current_epsilon(self) -> float:
        """``epsilon_for(self.ledger)``: computed once per ledger change, when asked for."""
        if self._eps_entries != len(self.ledger):
            p = self.cfg.privacy
            self.epsilon = epsilon_for(self.ledger, p.delta or 0.0, p.accountant)
            self._eps_entries = len(self.ledger)
        return self.epsilon

    def _epsilon_due(self, round_index: int) -> bool:
        """Whether round ``round_index`` releases a checkpoint, so privacy.json states the exact epsilon.

        Between checkpoints privacy.json holds the durable ledger and says its epsilon is pending
        (within the budget, by the budget check); computing it every round would cost more than
        the round at many rounds and small q (benchmarks/accounting_cost.py).
        """
        c = self.cfg
        return round_index % c.output.checkpoint_every == 0 or round_index == c.federation.rounds

    def _write_ledger(self, rd: RunDir, rounds_completed: int, exact: bool = True,
                      stopped: str | None = None) -> dict:
        """privacy.json (ledger and guarantee), then ledger-head.json: what has been paid."""
        record = self.privacy_record(rounds_completed, stopped, exact, with_ledger=False)
        rd.write_privacy(record, ledger_json=self.ledger.to_json())
        rd.write_head(len(self.ledger), self.ledger.digest())
        return record

    def _budget_allows(self, event, round_index: int) -> bool:
        """Whether paying ``event`` for ``round_index`` keeps the ledger within the budget.

        Exact, without an accountant call per round: a :class:`BudgetCheck` finds once how
        many more such events fit (up to the last round), and is built anew from the whole
        ledger whenever the ledger changed otherwise (a resume, another mechanism).
        """
        p = self.cfg.privacy
        built = self._budget_check
        if built is None or built[1].event != event or not 0 < len(self.ledger) - built[0] + 1 <= built[1].horizon:
            check = BudgetCheck(self.ledger.events, event, p.delta or 0.0, p.accountant, p.budget,
                                self.cfg.federation.rounds - round_index + 1)
            built = self._budget_check = (len(self.ledger), check)
        return built[1].allows(len(self.ledger) - built[0] + 1)

    def privacy_record(self, rounds_completed: int, stopped: str | None = None, exact: bool = True,
                       with_ledger: bool = True) -> dict:
        p = self.cfg.privacy
        eps = self.current_epsilon() if (exact or self.example or not self.algo.private) else None
        return guarantee_record(
            mode=p.mode, ledger=self.ledger, epsilon=eps, delta=p.delta or 0.0,
            accountant=p.accountant,
            noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm,
            sampling_rate=self.algo.sampling_rate, num_clients=self.algo.num_clients,
            clients_per_round=self.algo.clients_per_round, rounds_completed=rounds_completed,
            seeded_noise=p.seeded_noise, budget=p.budget if p.mode != "none" else None,
            stopped=stopped, population=self.population, pseudo_users=self.cfg.data.pseudo_users,
            with_ledger=with_ledger, runtime=self.runtime_kind,
            adaptive_clipping={
                "initial_clip_norm": p.clip_norm, "target_quantile": a.target_quantile,
                "learning_rate": a.learning_rate, "clipped_count_stddev": a.count_stddev,
                "update_noise_multiplier": self.algo.update_noise_multiplier,
            } if (a := self.algo.adaptive) is not None else None, silos=[
                {"silo": s.silo_id, "epsilon": self.silo_epsilon[s.silo_id],
                 "sampling_rate": s.dp.sampling_rate,
                 "noise_multiplier": s.dp.noise_multiplier, "steps_per_round": s.steps,
                 "stopped": self.silo_stopped.get(s.silo_id)}
                for s in self.silos.values()
            ] if self.example else None,
        )

    # -- the loop --------------------------------------------------------------
    def run(self, out: Path | None = None, progress: bool = True,
            stop_when: Callable[[dict], bool] | None = None, resume: bool = False) -> RunResult:
        """Run all rounds (or until the budget stop, or ``stop_when(metrics_row)`` is true).

        With ``resume=True``, ``out`` is an existing run directory: the run
        continues after its last completed round (see :meth:`_resume`).
        """
        rd = RunDir(out or self.cfg.output.dir or default_run_dir())
        if not resume:
            rd.check_new()  # before anything is written there
        rd.lock()  # one live run per directory; released by the kernel if we die
        self.workdir = rd.path
        try:
            state, metrics = self._resume(rd) if resume else self._start(rd)
            self._start_workers()  # before any round is paid: a worker that cannot start costs no budget
            return self._loop(rd, state, metrics, progress, stop_when)
        finally:
            self.close()
            rd.unlock()

    def _start(self, rd: RunDir, restart: bool = False) -> tuple[dp_fedavg.ServerState, list[dict]]:
        if not restart:
            rd.create()
        rd.write_config(self.cfg.to_toml())
        if self.audit_plan is not None:
            save_plan(rd.path, self.audit_plan)
        if self.scrub_counts is not None:
            rd.write_scrub({"operator": self.cfg.data.scrub.operator, "counts": self.scrub_counts,
                            "detector": f"spacy:{self.cfg.data.scrub.spacy_model}" if self.cfg.data.scrub.spacy_model
                            else "patterns", "clients": self.corpus.num_clients})
        # privacy.json (empty ledger) first: a state file without it cannot exist.
        self._write_ledger(rd, 0)
        state = dp_fedavg.init(self.algo, get_params(self.model))
        if hasattr(self.model, "save_adapter_config"):
            self.model.save_adapter_config(rd.path / "checkpoints")
        self._checkpoint(rd, 0, state.params)
        rd.save_state(0, state.params, state.opt_state, len(self.ledger), self._saved_clip(state),
                      self.ledger.digest())
        return state, []

    def _resume(self, rd: RunDir) -> tuple[dp_fedavg.ServerState, list[dict]]:
        """Load the last durable state of ``rd``; never forget a spent round.

        The ledger on disk is the truth about what was spent. Rounds after the
        saved state were paid for but their results are gone. With seeded noise
        (and in non-private runs) such a round is replayed bit for bit under its
        existing entry: the same sampling, batches and noise give the same
        release, so it is not paid twice. With secure noise the lost round's
        entry is marked ``lost`` and stays counted, and the round runs again
        with fresh noise under a new entry.
        """
        if rd.remove_partial_writes() + remove_stale_token_files(rd.path):
            log.info("%s: removed temp files of writes interrupted by the crash", rd.path)
        if not rd.privacy_path.exists():
            if rd.state_path.exists():
                raise DataError(f"{rd.privacy_path}: missing, but {rd.state_path.name} exists; "
                                "the ledger is gone, refusing to guess what was spent")
            log.warning("%s: the run had not started; starting it from round 0", rd.path)
            return self._start(rd, restart=True)
        record = rd.read_privacy()
        if not isinstance(record, dict):
            raise DataError(f"{rd.privacy_path}: corrupt (not a JSON object)")
        kind = record.get("runtime") or ("flower" if "Flower nodes" in str(record.get("population")) else "in-process")
        if kind != self.runtime_kind:
            raise DataError(f"{rd.privacy_path}: a run on the {kind} runtime; it cannot be resumed {self.runtime_kind}"
                            " (the server would load every node's data itself): start a new run instead")
        if record.get("mode") != self.cfg.privacy.mode:
            raise DataError(f"{rd.privacy_path}: mode {record.get('mode')!r} does not match config.toml's "
                            f"{self.cfg.privacy.mode!r}")
        try:
            ledger = Ledger.from_list(record.get("ledger"), mode=self.cfg.privacy.mode)
        except ValueError as e:
            raise DataError(f"{rd.privacy_path}: corrupt ledger ({e})") from None
        head = rd.read_head()
        if head is None and (len(ledger) or rd.state_path.exists()):
            raise DataError(f"{rd.head_path}: missing, but the run has started; refusing to trust "
                            "privacy.json's ledger without it")
        if head is not None:
            paid, digest = head
            if len(ledger) < paid or ledger.digest(paid) != digest:
                raise DataError(f"{rd.privacy_path}: its ledger ({len(ledger)} entries) does not extend the "
                                f"{paid} entries paid per {rd.head_path.name}; refusing to under-count "
                                "(an older, edited or replaced privacy.json?)")
        if not rd.state_path.exists() and len(ledger) == 0:
            log.warning("%s: the run had not started; starting it from round 0", rd.path)
            return self._start(rd, restart=True)
        if (rd.path / "scrub.json").exists() != (self.scrub_counts is not None):
            raise DataError(f"{rd.path / 'scrub.json'}: " + ("present, but config.toml does not scrub"
                            if self.scrub_counts is None else "missing, but config.toml scrubs")
                            + "; refusing files this run did not write")
        if load_plan(rd.path) != self.audit_plan:
            raise DataError(f"{rd.path / 'audit'}: the audit canaries differ from the ones this run trained "
                            "with (pass the saved plan: privlm.resume / privlm run --resume load it)")
        done, params, opt_state, paid_entries, clip_norm, state_digest = rd.load_state()
        metrics = [m for m in rd.read_metrics() if m["round"] <= done]  # (validated before anything is written)
        if (clip_norm is not None) != (self.algo.adaptive is not None):
            raise DataError(f"{rd.state_path}: its clip norm state does not match privacy.adaptive_clipping "
                            "in config.toml; is config.toml the run's own?")
        if len(ledger) < paid_entries:
            raise DataError(f"{rd.privacy_path}: {len(ledger)} ledger entries, but the resume state was "
                            f"saved after {paid_entries}; refusing to under-count (stale privacy.json?)")
        if state_digest is None or ledger.digest(paid_entries) != state_digest:
            raise DataError(f"{rd.privacy_path}: its first {paid_entries} ledger entries are not the ones "
                            f"{rd.state_path.name} was saved after (digest mismatch); refusing an edited "
                            "or replaced ledger")
        unknown = set(ledger.silos()) - set(self.silo_epsilon)
        if unknown:
            raise DataError(f"{rd.privacy_path}: ledger has silos {sorted(unknown)[:3]} that the data "
                            "no longer has; refusing to forget what they spent")
        reference = get_params(self.model)
        for name, ref in reference.items():
            if name not in params or params[name].shape != ref.shape or params[name].dtype != ref.dtype:
                raise DataError(f"{rd.state_path}: parameter {name!r} missing or not {tuple(ref.shape)} "
                                f"{ref.dtype}; is config.toml the run's own?")
        if set(params) != set(reference) or set(opt_state) != set(self.algo.server_optimizer.init(reference)):
            raise DataError(f"{rd.state_path}: its tensors do not match the model and server optimizer")
        for r in range(1, done + 1 if not self.example else 1):  # (a silo-round may cost nothing)
            if ledger.entry_for(r) is None:
                raise DataError(f"{rd.privacy_path}: no ledger entry for round {r}, which the resume "
                                "state says completed; refusing to under-count")
        if self.replayable:
            later = sorted({e.round for e in ledger if e.round > done and not e.lost})
            if later and later != [done + 1]:
                raise DataError(f"{rd.privacy_path}: ledger entries for rounds {later} after the saved "
                                f"round {done}; the run directory is inconsistent")
        else:
            for e in ledger.mark_lost_after(done):
                log.warning("round %d was paid for but its result was lost; it stays counted "
                            "and runs again with fresh noise", e.round)
        last_paid = max((e.round for e in ledger), default=0)
        beyond = [r for r in rd.checkpoints() if r > max(last_paid, done)]
        if beyond:
            raise DataError(f"{rd.checkpoint_path(beyond[0])}: a checkpoint of a round the ledger never paid "
                            "for; refusing files this run did not write")
        self.ledger = ledger
        self._eps_entries = -1  # recompute for the loaded ledger
        self._budget_check = None
        if self.example:
            for sid in self.silo_epsilon:
                self.silo_epsilon[sid] = epsilon_for(ledger.for_silo(sid), self.cfg.privacy.delta,
                                                     self.cfg.privacy.accountant)
            self.epsilon = max(self.silo_epsilon.values())
            self._eps_entries = len(ledger)
        self._write_ledger(rd, done)  # (lost marks, if any, and the exact epsilon of the ledger)
        return dp_fedavg.ServerState(params=params, opt_state=opt_state, round=done,
                                     clip_norm=clip_norm if clip_norm is not None else self.algo.clip_norm), metrics

    def _pay_silos(self, rd: RunDir, r: int) -> tuple[list[int], str | None]:
        """Example-level mode: which silos train in round ``r``, each having paid first.

        Each taking-part silo's budget is checked against its own ledger; a silo
        whose next round would exceed the budget stops contributing (for good).
        The entries are durable before any silo trains. Returns (silos, stop reason).
        """
        c, p = self.cfg, self.cfg.privacy
        ids = self.algo.sample_clients(_sampling_rng(c, r))
        paid = {e.silo for e in self.ledger if e.round == r and not e.lost and e.silo is not None}
        if paid:  # a resumed (seeded) replay: exactly the silos that paid, with the planned events
            for e in self.ledger:
                if e.round == r and not e.lost and e.silo is not None:
                    plan = next(s for s in self.silos.values() if s.silo_id == e.silo)
                    if e.event != silo_round_event(plan.dp, plan.steps):
                        raise DataError(f"{rd.privacy_path}: round {r} of silo {e.silo} was paid for with "
                                        "a different mechanism than config.toml describes")
            return [i for i in ids if self.silos[i].silo_id in paid], None
        active = []
        for i in ids:
            plan = self.silos[i]
            sid = plan.silo_id
            if sid in self.silo_stopped:
                continue
            event = silo_round_event(plan.dp, plan.steps)
            eps = epsilon_for([*self.ledger.for_silo(sid), event], p.delta, p.accountant)
            if p.budget is not None and eps > p.budget:
                self.silo_stopped[sid] = (f"stopped before round {r}: it would raise the silo's epsilon "
                                          f"to {eps:.4f}, above the budget {p.budget:g}")
                log.warning("silo %s %s", sid, self.silo_stopped[sid])
                continue
            self.ledger.append(r, event, silo=sid)
            self.silo_epsilon[sid] = eps
            active.append(i)
        if len(self.silo_stopped) == len(self.silos):
            return [], f"budget stop: every silo has reached its budget; round {r} did not run"
        self.epsilon = max(self.silo_epsilon.values())
        self._eps_entries = len(self.ledger)
        self._write_ledger(rd, r - 1)
        return active, None

    def _saved_clip(self, state: dp_fedavg.ServerState) -> float | None:
        return state.clip_norm if self.algo.adaptive is not None else None

    def _checkpoint(self, rd: RunDir, round_index: int, params: dict) -> None:
        rd.save_checkpoint(round_index, to_checkpoint(self.model, params))

    @property
    def replayable(self) -> bool:
        """Whether a round is a pure function of (state, round): seeded or non-private, and no
        dropout masks drawn by parallel clients from the shared generator in thread order."""
        return (self.cfg.privacy.seeded_noise or self.cfg.privacy.mode == "none") and not self._racing_dropout

    def _loop(self, rd: RunDir, state: dp_fedavg.ServerState, metrics: list[dict], progress: bool,
              stop_when: Callable[[dict], bool] | None) -> RunResult:
        c = self.cfg
        if c.privacy.seeded_noise and c.privacy.mode != "none":
            log.warning("privacy.seeded_noise = true: noise is NOT secure; the guarantee does not hold")
        stopped = None
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        eval_loss = evals[-1]["eval_loss"] if evals else float("nan")
        eval_acc = evals[-1]["eval_accuracy"] if evals else float("nan")
        bar = _progress(progress)
        with bar or nullcontext():
            rounds_task = bar.add_task("rounds", total=c.federation.rounds, completed=state.round) if bar else None
            clients_task = bar.add_task("clients", total=None) if bar else None
            for r in range(state.round + 1, c.federation.rounds + 1):
                t0 = time.perf_counter()
                # 1. Budget check, then the round's privacy cost, durable before anything else.
                if self.replayable:  # e.g. dropout: make the round a function of (state, r)
                    seed_torch(derived_seed(c.seed, "torch", r))
                if self.example:
                    ids, stopped = self._pay_silos(rd, r)
                    eps = self.epsilon
                    if stopped:
                        break
                else:
                    event = self.algo.round_event()
                    paid = self.ledger.entry_for(r)
                    fixed_clip = self.algo.clip_norm if self.algo.private and self.algo.adaptive is None else None
                    if paid is not None:  # a resumed replay of a round already paid for
                        if (paid.event, paid.clip_norm) != (event, fixed_clip):
                            raise DataError(f"{rd.privacy_path}: round {r} was paid for with a different "
                                            "mechanism than config.toml describes")
                    else:
                        if self.algo.private and not self._budget_allows(event, r):
                            over = epsilon_for([*self.ledger.events, event], c.privacy.delta, c.privacy.accountant)
                            stopped = (f"budget stop: round {r} would raise epsilon to {over:.4f}, "
                                       f"above the budget {c.privacy.budget:g}; it did not run")
                            break
                        self.ledger.append(r, event, clip_norm=fixed_clip)
                        self._write_ledger(rd, r - 1, exact=not self.algo.private)
                    eps = self.current_epsilon() if self.algo.private and self._epsilon_due(r) else None
                    if eps is not None and c.privacy.budget is not None and eps > c.privacy.budget:
                        # BudgetCheck assumes epsilon never falls as rounds are added; should
                        # dp-accounting's numbers ever break that, nothing is released over budget.
                        stopped = (f"budget stop: round {r} raised epsilon to {eps:.4f}, above the budget "
                                   f"{c.privacy.budget:g}; it was paid for but did not run")
                        break
                    # 2. Sample (after the entry is durable), train, aggregate, noise, server step.
                    ids = self.algo.sample_clients(_sampling_rng(c, r))
                fault_point("ledger-written", r)
                if bar:
                    bar.reset(clients_task, total=len(ids))
                advance = (lambda: bar.advance(clients_task)) if bar else None
                self.dropped = 0  # sampled clients that never answered (a remote runtime counts them)
                state, stats = dp_fedavg.apply(
                    self.algo, state, self.contributions(state, ids, advance),
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
                    eval_loss, eval_acc = self.evaluate(state.params)
                row = {
                    "round": r,
                    "train_loss": _num(stats.train_loss),
                    "eval_loss": _num(eval_loss) if evaluated else None,
                    "eval_accuracy": _num(eval_acc) if evaluated else None,
                    "epsilon": eps,
                    "clients": stats.clients,
                    "sampled": len(ids),
                    "rejected": stats.rejected,
                    "dropped": self.dropped,
                    "clipped": stats.clipped,
                    "clip_norm": stats.clip_norm,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
                metrics.append(row)
                rd.write_metrics(metrics)
                fault_point("metrics-written", r)
                if r % c.output.checkpoint_every == 0 or r == c.federation.rounds:
                    self._checkpoint(rd, r, state.params)
                    fault_point("checkpoint-written", r)
                rd.save_state(r, state.params, state.opt_state, len(self.ledger), self._saved_clip(state),
                              self.ledger.digest())
                fault_point("state-written", r)
                if eps is not None or not self.algo.private or self.example:  # (else: next round's write)
                    self._write_ledger(rd, r, exact=True)
                if stop_when is not None and stop_when(row):
                    if r % c.output.checkpoint_every and r != c.federation.rounds:
                        self._checkpoint(rd, r, state.params)
                    break
                if bar:
                    shown = self.epsilon if self._eps_entries and math.isfinite(self.epsilon) else None
                    bar.update(rounds_task, advance=1,
                               description=f"rounds (acc {eval_acc:.3f}" + (f", eps {shown:.2f})" if shown else ")"))
        completed = state.round
        if stopped:
            log.warning(stopped)
            if completed and completed % c.output.checkpoint_every:
                self._checkpoint(rd, completed, state.params)
        if completed and (math.isnan(eval_loss) or (metrics and metrics[-1]["eval_loss"] is None)):
            eval_loss, eval_acc = self.evaluate(state.params)
        record = self._write_ledger(rd, completed, stopped=stopped)
        from privlm.report.html import write_report

        write_report(rd)
        return RunResult(
            run_dir=rd.path, rounds_completed=completed, epsilon=record["epsilon"],
            delta=record["delta"], eval_loss=eval_loss, eval_accuracy=eval_acc,
            stopped=stopped, metrics=metrics, corpus_stats=self.corpus.stats(), population=self.population,
        )


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=False)


def run(cfg: RunConfig, out: Path | None = None, progress: bool = True,
        corpus: FederatedCorpus | None = None) -> RunResult:
    """Run ``cfg`` and return its results (the notebook API).

    In process, or on Flower's simulation engine with ``runtime = "flower-simulation"``.
    """
    if cfg.runtime == "flower-simulation":
        if corpus is not None:
            raise ConfigError('runtime: "flower-simulation" reads the data on the nodes; pass no corpus')
        from privlm.runtime.flower.ray_simulation import run_flower_simulation

        return result_from_run_dir(run_flower_simulation(cfg, out, progress))
    return Simulation(cfg, corpus, progress).run(out, progress)


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


def resume(run_dir: Path, progress: bool = True, corpus: FederatedCorpus | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last durable state, with its own config.toml."""
    from privlm.config import load_config

    rd = open_run_dir(run_dir)
    cfg = load_config(rd.config_path, [])
    return Simulation(cfg, corpus, progress, load_plan(rd.path)).run(rd.path, progress, resume=True)


__all__ = ["RunResult", "Simulation", "run", "resume", "build_model", "resolve_privacy",
           "to_checkpoint", "from_checkpoint"]
