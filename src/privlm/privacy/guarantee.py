"""The guarantee a run can claim, computed from its ledger and nothing else."""

from __future__ import annotations

import math

from privlm.privacy.ledger import Ledger


def guarantee_record(
    *,
    mode: str,
    ledger: Ledger,
    epsilon: float,
    delta: float,
    accountant: str,
    noise_multiplier: float | None,
    clip_norm: float | None,
    sampling_rate: float,
    num_clients: int,
    clients_per_round: int,
    rounds_completed: int,
    seeded_noise: bool,
    budget: float | None,
    stopped: str | None = None,
    silos: list[dict] | None = None,
    population: str | None = None,
    adaptive_clipping: dict | None = None,
    pseudo_users: int | None = None,
) -> dict:
    """The content of ``privacy.json``.

    ``epsilon`` must be ``epsilon_for(ledger, delta, accountant)``: the caller
    computes it once per ledger change (it is the budget check's number) and
    this record is checked against it in tests; ``privlm epsilon --ledger``
    recomputes it from the stored ledger.
    """
    eps = epsilon
    population = population or f"the {num_clients} clients of the data"
    if mode == "none":
        words = "No differential privacy: this model was trained without clipping or noise."
    elif mode == "example":
        words = (
            f"Example-level (record-level) differential privacy inside each silo: each record of "
            f"silo s is protected with (epsilon_s, {delta:.3g}): adding or removing one record of "
            f"that silo changes the probability of any outcome of the released checkpoints by at "
            f"most a factor e^epsilon_s, except with probability {delta:.3g}. "
            + " ".join(f"Silo {s['silo']}: epsilon {s['epsilon']:.3g}." for s in silos or [])
            + f" Mechanism: DP-SGD (Opacus per-record gradients) in each silo, per-record L2 "
            f"clipping to C={clip_norm}, Poisson sampling of records, Gaussian noise on each step's "
            f"sum; the server's average of the silos' updates is post-processing; "
            f"{accountant.upper()} accounting. Not protected: a silo's participation or its size, "
            f"and a person with several records is protected only as their records add up "
            f"(group privacy)."
        )
        words += (" Not covered: the per-round diagnostics in metrics.jsonl and the logs.")
        if seeded_noise:
            words += " WARNING: noise was seeded (test mode); this guarantee does NOT hold."
    else:
        words = (
            f"User-level ({eps:.3g}, {delta:.3g})-differential privacy: for any one client "
            f"(user) of the population ({population}), adding or removing all of that "
            f"user's data changes the probability of any outcome of the released model "
            f"checkpoints by at most a factor e^{eps:.3g}, except with probability {delta:.3g}. "
            f"Mechanism: Poisson sampling with q={sampling_rate:.4g}, per-user L2 clipping to "
            f"C={clip_norm}, Gaussian noise of std {noise_multiplier:.4g}*C on the sum, "
            f"{len(ledger)} rounds, {accountant.upper()} accounting."
        )
        if pseudo_users:
            words += (f" The protected unit is a PSEUDO-USER: each real client's lines were cut into "
                      f"{pseudo_users} parts that take part independently, so one real client is "
                      f"protected only by group privacy over up to {pseudo_users} such units "
                      f"(a much weaker guarantee than the epsilon above).")
        if adaptive_clipping:
            a = adaptive_clipping
            words += (f" With adaptive clipping (Andrew et al. 2021): C starts at {a['initial_clip_norm']:g} and "
                      f"follows the {a['target_quantile']:g} quantile of update norms, learned from a count of "
                      f"unclipped updates noised with std {a['clipped_count_stddev']:.4g}; the update noise is "
                      f"raised to {a['update_noise_multiplier']:.4g}*C so that each round costs exactly one "
                      f"Gaussian mechanism with multiplier {noise_multiplier:.4g}, which is what the ledger "
                      f"records.")
        if ledger.lost:
            words += (f" {ledger.lost} of those rounds were paid for but lost to a crash and"
                      " run again; they are counted.")
        words += (" Covered: the model checkpoints (and anything computed from them alone)."
                  " Not covered: the per-round diagnostics in metrics.jsonl and the logs"
                  " (train_loss, clients, sampled, clipped, rejected, eval_*), which are"
                  " computed from clients' data without noise: keep them with the operator.")
        if seeded_noise:
            words += " WARNING: noise was seeded (test mode); this guarantee does NOT hold."
    return {
        "mode": mode,
        "unit": "pseudo-user" if (mode == "user" and pseudo_users) else {"user": "user", "example": "record"}.get(mode),
        "pseudo_users_per_client": pseudo_users,
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": delta if mode != "none" else None,
        "accountant": accountant,
        "noise_multiplier": noise_multiplier if mode == "user" else None,
        "clip_norm": clip_norm if mode == "user" else None,
        "sampling_rate": sampling_rate,
        "num_clients": num_clients,
        "population": population,
        "adaptive_clipping": adaptive_clipping,
        "clients_per_round": clients_per_round,
        "rounds_completed": rounds_completed,
        "rounds_spent": len(ledger),
        "rounds_lost": ledger.lost,
        "budget_epsilon": budget,
        "secure_noise": not seeded_noise,
        "stopped": stopped,
        "covers": ["checkpoints/*.safetensors"] if mode != "none" else [],
        "silos": silos,
        "not_covered": ["metrics.jsonl", "report.html metrics", "logs"],
        "guarantee": words,
        "ledger": ledger.to_list(),
    }
