"""The one place that turns a config into objects: corpus, model, mechanism, executor, engine.

``resolve_*`` fix the privacy settings once (delta defaulted, z calibrated, feasibility
checked) into a frozen :class:`~privlm.engine.accounts.ResolvedPrivacy`; the config the run
directory stores is a copy with those values filled in, so a resume uses the very same
mechanism. The caller's config is never modified.
"""

from __future__ import annotations

import math

import logging

import torch

import privlm.data as _data
from privlm.audit import AuditPlan, apply_plan, draw_plan
from privlm.config import RunConfig
from privlm.data.corpus import FederatedCorpus, group_into_silos, split_into_pseudo_users
from privlm.data.scrub import scrub_corpus, settings_for_run
from privlm.engine.accounts import ResolvedPrivacy
from privlm.engine.executor import Executor, Population
from privlm.engine.rounds import Engine
from privlm.errors import ConfigError, DataError
from privlm.federated.client import LocalTraining
from privlm.federated.dp_fedavg import FedAvg
from privlm.federated.dp_sgd import ExampleDP, steps_per_round
from privlm.federated.server_opt import ServerOptimizer
from privlm.mechanisms import (AdaptiveClipGaussian, AdaptiveClipping, BandedMF, GaussianFedAvg, Mechanism,
                               NonPrivateFedAvg, SiloDPSGD)
from privlm.models.factory import build_model
from privlm.models.params import block_size as model_block_size
from privlm.privacy.banded import coefficients_problem, optimal_banded_toeplitz
from privlm.privacy.accountant import accounting_problem, calibrate_noise_multiplier, default_delta, epsilon_for
from privlm.privacy.guarantee import weak_delta_warning
from privlm.runtime.batched import BatchedExecutor, check_batched
from privlm.runtime.clients import LocalClients
from privlm.runtime.processes import ProcessExecutor
from privlm.runtime.sequential import SequentialExecutor
from privlm.runtime.threads import ThreadExecutor
from privlm.runtime.training import local_training, resolve_device, threads_per_worker

log = logging.getLogger(__name__)


# -- privacy -------------------------------------------------------------------------
def adaptive_clipping(cfg: RunConfig) -> AdaptiveClipping | None:
    """The adaptive-clipping settings of a user-level config, or None."""
    m = cfg.privacy.user_mechanism
    if m.kind != "adaptive":
        return None
    stddev = m.clipped_count_stddev if m.clipped_count_stddev is not None else cfg.federation.clients_per_round / 20
    return AdaptiveClipping(m.target_quantile, m.learning_rate, stddev)


def _frozen(cfg: RunConfig) -> ResolvedPrivacy:
    p = cfg.privacy
    return ResolvedPrivacy(mode=p.mode, delta=p.delta, accountant=p.accountant, budget=p.budget,
                           seeded_noise=p.seeded_noise, noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm)


def resolve_privacy(cfg: RunConfig, num_clients: int) -> tuple[RunConfig, ResolvedPrivacy]:
    """User-level (or non-private) settings for ``num_clients``: delta, the calibrated z, checks.

    Returns the config to store (a copy with them filled in) and the frozen settings.
    """
    p = cfg.privacy
    if cfg.federation.clients_per_round > num_clients:
        raise ConfigError(f"federation.clients_per_round: {cfg.federation.clients_per_round} exceeds the "
                          f"{num_clients} clients of the data")
    if p.mode != "user":  # "none"; "example" is resolve_silos'
        return cfg, _frozen(cfg)
    delta = p.delta if p.delta is not None else default_delta(num_clients)
    if delta >= 1.0 / num_clients:
        raise ConfigError(f"privacy.delta: {delta:g} must be below 1/N = {1 / num_clients:g}")
    if (weak := weak_delta_warning(delta, "clients")) is not None:
        log.warning(weak)
    q = cfg.federation.clients_per_round / num_clients
    compositions, scale = cfg.federation.rounds, 1.0  # the accounting's (q, T) and z's unit
    new = cfg.model_copy(deep=True)
    banded = _banded_settings(new, num_clients)
    if banded is not None:  # a group's ceil(T/b) Poisson rounds; or one Gaussian of sensitivity s
        q, compositions, scale = (banded.sampling_rate, banded.participations, 1.0) if banded.sampling == "cyclic-poisson" \
            else (1.0, 1, banded.sensitivity)
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        if (problem := accounting_problem(q, 1.0, compositions)) is not None:
            raise ConfigError(f"federation.rounds: {problem[1]}")
        try:
            z = scale * calibrate_noise_multiplier(p.target_epsilon, q, compositions, delta, p.accountant)
        except ValueError as e:
            raise ConfigError(f"privacy.target_epsilon: {p.target_epsilon:g} cannot be met: {e}") from None
        if banded is not None and banded.sampling == "none":
            z = _meet_with_ledger_events(new, num_clients, z, scale, p.target_epsilon, delta, p.accountant)
    if (problem := accounting_problem(q, z / scale, compositions)) is not None:
        key = "privacy.noise_multiplier" if problem[0] == "noise_multiplier" else "federation.rounds"
        raise ConfigError(f"{key}: {problem[1]}")
    budget = p.budget
    if budget is not None:
        new.privacy.noise_multiplier = z
        first = make_mechanism(new, num_clients).event(1) if banded is not None else \
            GaussianFedAvg(num_clients, cfg.federation.clients_per_round, p.clip_norm, z).event()
        one = epsilon_for([first], delta, p.accountant)
        if one > budget:
            key = "privacy.max_epsilon" if p.max_epsilon is not None else "privacy.target_epsilon"
            raise ConfigError(f"{key}: budget {budget:g} is below the cost of a single round "
                              f"(epsilon {one:.3g} at z={z:.4g}, q={q:.4g}); raise it or the noise")
    new.privacy.delta = delta
    new.privacy.noise_multiplier = z
    if (adaptive := adaptive_clipping(new)) is not None:
        if new.privacy.mechanism is not None:  # (stored as given: one form)
            new.privacy.mechanism.clipped_count_stddev = adaptive.count_stddev  # type: ignore[union-attr]
        else:
            new.privacy.clipped_count_stddev = adaptive.count_stddev
        try:
            adaptive.update_noise_multiplier(z)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return new, _frozen(new)


def _meet_with_ledger_events(cfg: RunConfig, num_clients: int, z: float, scale: float, target: float,
                             delta: float, kind) -> float:
    """Banded MF without sampling: z calibrated as one Gaussian of sensitivity ``scale``, checked
    against the T events its ledger will hold (they compose to that Gaussian, but by another
    computation, which can differ in the last digits); stepped up by 1e-4 (in units of ``scale``)
    until those meet the target."""
    for _ in range(10_000):
        cfg.privacy.noise_multiplier = z
        mech = make_mechanism(cfg, num_clients)
        if epsilon_for([mech.event(r) for r in range(1, cfg.federation.rounds + 1)], delta, kind) <= target:
            return z
        z = scale * round(z / scale + 1e-4, 12)
    raise ConfigError(f"privacy.target_epsilon: {target:g}: no noise multiplier near the calibrated one meets it")


def _banded_settings(cfg: RunConfig, num_clients: int) -> BandedMF | None:
    """Banded MF's strategy (optimised now, stored in ``cfg``'s copy) and checks; None for other mechanisms.

    The mechanism it returns has a placeholder z (for its public numbers: q, k, sensitivity)."""
    m = cfg.privacy.mechanism
    if m is None or m.kind != "banded-mf":
        return None
    T, s = cfg.federation.rounds, cfg.server
    if m.bands > T:
        raise ConfigError(f"privacy.mechanism.bands: {m.bands} exceeds federation.rounds = {T}")
    if m.max_participations is not None and m.sampling != "none":
        raise ConfigError("privacy.mechanism.max_participations: for sampling = \"none\" (cyclic Poisson "
                          "sampling already takes each client at most once in every `bands` rounds)")
    if cfg.audit.update_canaries > 0:
        raise ConfigError("audit.update_canaries: white-box canaries are Poisson-sampled like DP-FedAvg's users, "
                          "not banded MF's; set it to 0 (audit.canaries, in the data, work)")
    workload = m.workload if m.workload != "auto" else ("momentum" if s.optimizer == "fedavgm" else "prefix")
    if workload == "momentum" and s.optimizer != "fedavgm":
        raise ConfigError("privacy.mechanism.workload: \"momentum\" is server.optimizer = \"fedavgm\"'s")
    if m.coefficients is None:
        m.coefficients = list(optimal_banded_toeplitz(T, m.bands, workload, s.beta1 if workload == "momentum" else 0.0))
    elif len(m.coefficients) != m.bands:
        raise ConfigError(f"privacy.mechanism.coefficients: {len(m.coefficients)} values for {m.bands} bands")
    else:
        problem = coefficients_problem(m.coefficients)
        if problem is not None:
            raise ConfigError(f"privacy.mechanism.coefficients: {problem}")
    try:
        return BandedMF(num_clients, cfg.federation.clients_per_round, cfg.privacy.clip_norm, 1.0,
                        tuple(m.coefficients), T, m.sampling, m.max_participations, workload)
    except ValueError as e:
        key = "privacy.mechanism.coefficients" if "coefficients" in str(e) else "federation.clients_per_round"
        raise ConfigError(f"{key}: {e}") from None


def resolve_silos(cfg: RunConfig, local: LocalTraining, num_silos: int) -> tuple[RunConfig, ResolvedPrivacy, SiloDPSGD]:
    """Example-level mode: each silo's DP-SGD mechanism, fixed up front from public settings only.

    q is ``privacy.example.sampling_rate`` (or ``client.batch_size / max_records``), the steps
    per round follow from q and ``client`` settings, z is calibrated from those, and delta
    defaults to ``max_records ** -1.1`` for ``privacy.example.max_records``, the declared public
    bound on records per silo. A silo's actual record count never enters the mechanism or
    privacy.json: with it, one record more or less would show.
    """
    p = cfg.privacy
    bound, q = p.example.max_records, p.example.sampling_rate
    if q is None and bound is None:
        raise ConfigError("privacy.example.sampling_rate: set it, or privacy.example.max_records (a public "
                          "upper bound on records per silo; q is then client.batch_size / max_records): "
                          "the mechanism must not depend on a silo's private record count")
    if p.delta is None and bound is None:
        raise ConfigError("privacy.example.max_records: needed for the default delta (max_records^-1.1); "
                          "set it (a public upper bound on records per silo) or set privacy.delta")
    if q is None:
        assert bound is not None
        q = min(1.0, cfg.client.batch_size / bound)
    delta = p.delta if p.delta is not None else default_delta(bound)  # type: ignore[arg-type]
    if bound is not None and delta >= 1.0 / bound:
        raise ConfigError(f"privacy.delta: {delta:g} must be below 1/max_records = {1 / bound:g}")
    if (weak := weak_delta_warning(delta, "records per silo")) is not None:
        log.warning(weak)
    new = cfg.model_copy(deep=True)
    new.privacy.delta = delta
    steps = steps_per_round(local, ExampleDP(q, 0.0, p.clip_norm))
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        z = calibrate_noise_multiplier(p.target_epsilon, q, cfg.federation.rounds * steps, delta, p.accountant)
    silo = SiloDPSGD(num_silos, cfg.federation.clients_per_round, ExampleDP(q, z, p.clip_norm, p.example.grad_sample_mode),
                     steps, delta)
    one = epsilon_for([silo.event()], delta, p.accountant)
    if p.budget is not None and one > p.budget:
        raise ConfigError(f"privacy.target_epsilon: budget {p.budget:g} is below one round's cost "
                          f"(epsilon {one:.3g}: {steps} steps at q={q:.3g}, z={z:.3g})")
    return new, _frozen(new), silo


def make_mechanism(cfg: RunConfig, num_clients: int, client_ids: tuple[str, ...] = ()) -> Mechanism:
    """The server-side mechanism of a resolved user-level or non-private config (``client_ids``:
    the population, which banded MF's cyclic sampling groups by)."""
    p, m = cfg.privacy, cfg.federation.clients_per_round
    if p.mode == "none":
        return NonPrivateFedAvg(num_clients, m, cfg.server.norm_bound)
    assert p.noise_multiplier is not None
    if (adaptive := adaptive_clipping(cfg)) is not None:
        return AdaptiveClipGaussian(num_clients, m, p.clip_norm, p.noise_multiplier, adaptive)
    if (b := p.mechanism) is not None and b.kind == "banded-mf":
        assert b.coefficients is not None  # (resolved)
        workload = b.workload if b.workload != "auto" else ("momentum" if cfg.server.optimizer == "fedavgm" else "prefix")
        return BandedMF(num_clients, m, p.clip_norm, p.noise_multiplier, tuple(b.coefficients), cfg.federation.rounds,
                        b.sampling, b.max_participations, workload, tuple(client_ids))
    return GaussianFedAvg(num_clients, m, p.clip_norm, p.noise_multiplier)


def check_defences(cfg: RunConfig) -> None:
    """Refuse a defence that would void the run's guarantee (one line naming the key)."""
    s, mode = cfg.server, cfg.privacy.mode
    if s.aggregator != "mean" and mode == "user":
        raise ConfigError(f"server.aggregator: {s.aggregator!r} would void the user-level DP guarantee (the noise is "
                          "calibrated to the sum of clipped updates; a robust statistic of them has no such bound); "
                          "under DP the defences are privacy.clip_norm and the noise, or measure it with privacy.mode = \"none\"")
    n = cfg.federation.clients_per_round  # (the cohort a robust statistic sees, without dropouts)
    if s.aggregator == "trimmed-mean" and math.floor(s.trim_fraction * n) < 1:
        raise ConfigError(f"server.trim_fraction: {s.trim_fraction:g} of {n} clients a round trims nothing "
                          f"(floor({s.trim_fraction:g} x {n}) = 0); raise it to at least {1 / n:.3g}")
    if s.aggregator == "krum":
        if n <= 2 * s.krum_byzantine + 2:
            raise ConfigError(f"server.krum_byzantine: Krum tolerates f attackers among n > 2f + 2 clients a round; "
                              f"{n} clients a round allow at most f = {max(0, (n - 3) // 2)}")
        if s.krum_selected > n - s.krum_byzantine:
            raise ConfigError(f"server.krum_selected: {s.krum_selected} is more than n - f = {n - s.krum_byzantine} "
                              f"of {n} clients a round (multi-Krum averages the best n - f at most)")
    if s.norm_bound is not None and mode != "none":
        raise ConfigError("server.norm_bound: is the non-private runs' norm bound; under DP privacy.clip_norm bounds "
                          "each update (set server.norm_bound only with privacy.mode = \"none\")")


def make_algorithm(cfg: RunConfig, mechanism: Mechanism) -> FedAvg:
    s = cfg.server
    check_defences(cfg)
    kind = {"mean": "streaming"}.get(s.aggregator, s.aggregator)
    by_kind: dict[str, dict[str, float]] = {"trimmed-mean": {"trim_fraction": s.trim_fraction},
                                            "krum": {"byzantine": s.krum_byzantine, "selected": s.krum_selected}}
    options = by_kind.get(s.aggregator, {})
    return FedAvg(mechanism, ServerOptimizer(s.optimizer, s.lr, s.beta1, s.beta2, s.tau, s.lr_schedule,
                                             cfg.federation.rounds, s.lr_final), kind, options)


# -- data ------------------------------------------------------------------------------
def prepare_corpus(cfg: RunConfig, corpus: FederatedCorpus | None, progress: bool, audit_plan: AuditPlan | None
                   ) -> tuple[FederatedCorpus, dict[str, int] | None, AuditPlan | None]:
    """The population as the server sees it: loaded, scrubbed on each client, canaries in, silos merged."""
    corpus = corpus if corpus is not None else _data.corpus_of(cfg)
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


def _in_process_population(cfg: RunConfig, corpus: FederatedCorpus, scrub_counts: dict[str, int] | None) -> Population:
    description = f"the {corpus.num_clients} clients of the data (in-process simulation)"
    if cfg.data.pseudo_users is not None:  # (what that means for a real client: the guarantee text)
        description = (f"the {corpus.num_clients} pseudo-users made by cutting each of the "
                       f"{corpus.info['real_clients']} clients' lines into {cfg.data.pseudo_users} "
                       "parts (in-process simulation)")
    return Population(tuple(c.client_id for c in corpus.clients), description, "in-process", scrub_counts,
                      corpus.stats())


# -- runs ------------------------------------------------------------------------------
def in_process(cfg: RunConfig, corpus: FederatedCorpus | None = None, progress: bool = False,
               audit_plan: AuditPlan | None = None) -> tuple[Engine, LocalClients]:
    """An in-process run: its engine, and the clients its executor trains."""
    check_defences(cfg)  # (the checks of the config alone, before the corpus is read and scrubbed)
    if cfg.attack.kind != "none":
        _check_attack(cfg)
    if cfg.worker_kind == "batched":
        check_batched(cfg)
    corpus, scrub_counts, audit_plan = prepare_corpus(cfg, corpus, progress, audit_plan)
    attack = None
    if cfg.attack.kind != "none":  # simulation only (issue #24): the malicious clients' text, poisoned
        from privlm import attacks

        attack = attacks.plan_attack(cfg, [c.client_id for c in corpus.clients])
        corpus = attacks.poison_corpus(corpus, attack)  # type: ignore[arg-type]
    local = local_training(cfg)
    n = corpus.num_clients
    resolved, privacy = resolve_privacy(cfg, n)
    example = cfg.privacy.mode == "example"
    if example and cfg.model.kind == "lstm":
        raise ConfigError('model.kind: "lstm" under example-level DP-SGD needs Opacus\'s DPLSTM, not wired yet; '
                          'use model.kind = "transformer" or privacy.mode = "user"')
    if example and cfg.workers > 1:
        raise ConfigError("workers: example-level silos (DP-SGD with Opacus) train one at a time; "
                          "set workers = 1")
    torch.manual_seed(resolved.seed)
    model, tok = build_model(resolved)
    device = resolve_device(resolved)  # local training and evaluation; server state stays on the host
    model.to(device)
    if resolved.workers > 1 and resolved.worker_kind == "process" and device.type != "cpu":
        raise ConfigError(f"worker_kind: \"process\" trains on the CPU, but device is {resolved.device!r}; "
                          "use worker_kind = \"thread\" on a GPU")
    silo = None
    if example:
        resolved, privacy, silo = resolve_silos(resolved, local, n)
    population = _in_process_population(resolved, corpus, scrub_counts)
    clients = LocalClients(resolved, corpus, model, tok, device, local, population, silo)
    executor: Executor
    if resolved.worker_kind == "batched":  # (K = workers clients per batch, 1 included)
        executor = BatchedExecutor(clients, resolved.workers)
    elif resolved.workers > 1 and resolved.worker_kind == "process":
        executor = ProcessExecutor(clients, resolved.workers)
    elif resolved.workers > 1:
        if device.type == "cpu":
            # W clients at once, each with cpus // W threads per op: small models gain more
            # from that than from intra-op threads (benchmarks/RESULTS.md, issue #3)
            torch.set_num_threads(threads_per_worker(resolved.workers))
        executor = ThreadExecutor(clients, resolved.workers)
    else:
        executor = SequentialExecutor(clients)
    if attack is not None:
        window = model_block_size(model)
        if attack.kind == "backdoor" and tok.encode(attack.target).numel() + 1 > window:
            raise ConfigError(f"attack.target: {tok.encode(attack.target).numel()} tokens leave no room for a prompt "
                              f"in the model's window of {window}")
        held_out = [corpus.clients[i].test for i in clients.eval_clients if corpus.clients[i].client_id not in attack.malicious]
        executor = attacks.AttackedExecutor(executor, attack, model, tok,
                                            attacks.trigger_prompts(held_out, attack, resolved.attack.eval_prompts))
    mechanism: Mechanism = silo if silo is not None else make_mechanism(resolved, n, executor.population.client_ids)
    return Engine(resolved, privacy, make_algorithm(resolved, mechanism), executor, model, audit_plan), clients


def _check_attack(cfg: RunConfig) -> None:
    if cfg.runtime != "simulation":
        raise ConfigError("attack.kind: a poisoning attack is simulated in-process only (runtime = \"simulation\")")
    if cfg.privacy.mode == "example":
        raise ConfigError("attack.kind: the attack simulates malicious users (privacy.mode = \"user\" or \"none\"), "
                          "not silos")


def with_executor(cfg: RunConfig, executor: Executor) -> Engine:
    """A run whose clients live elsewhere (the Flower grid): the server's model, mechanism, engine."""
    if cfg.attack.kind != "none":
        raise ConfigError("attack.kind: a poisoning attack is simulated in-process only, never on a Flower grid")
    check_defences(cfg)
    resolved, privacy = resolve_privacy(cfg, executor.population.num_clients)
    torch.manual_seed(resolved.seed)
    model, _ = build_model(resolved)
    model.to(resolve_device(resolved))
    mechanism = make_mechanism(resolved, executor.population.num_clients, executor.population.client_ids)
    return Engine(resolved, privacy, make_algorithm(resolved, mechanism), executor, model)


