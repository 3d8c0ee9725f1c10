"""The guarantee a run can claim, computed from its ledger and nothing else."""

from __future__ import annotations

import math

from privlm.privacy.ledger import Ledger

# A delta above this protects little: with probability up to delta the mechanism may as well
# publish a user's data, and delta = 1e-3 over N = 1,000 users is one user in expectation.
WEAK_DELTA = 1e-3

# Files of a run directory computed from clients' data WITHOUT noise: not covered by the
# guarantee; keep them with the operator. (checkpoints/ and, except for banded MF,
# state.safetensors are covered.)
NOT_COVERED = [
    "metrics.jsonl (train_loss, clients, sampled, clipped, rejected, dropped, clip_norm, eval_*)",
    "report.html (its metrics)",
    "scrub.json (exact counts of PII replaced, per entity type)",
    "audit.json and audit/ (canary secrets, which clients hold them, attack results)",
    "logs (warnings such as per-silo truncated-record counts)",
    ".privlm-worker-tokens-*.npy (raw client tokens; exist only while worker processes start, "
    "left behind only by a run killed then, and removed by its resume)",
]

# A simulated poisoning attack's log (privlm.attacks): measured on honest clients' held-out text,
# and it shows how often the malicious clients (real clients, drawn from the seed) were sampled.
ATTACK_LOG = ("attack.json (simulated attack: malicious updates per round, i.e. when those clients were "
              "sampled, and the backdoor's success on honest clients' held-out text)")

# Banded MF's resume state holds the noise itself: with the checkpoints it gives the last rounds'
# clipped sums without noise.
BANDED_STATE = ("state.safetensors (banded MF: the last b-1 rounds' noise, which with the checkpoints gives "
                "those rounds' sums without noise, and which clients took part when)")

_DEFINITION = ("for any two neighbouring datasets D, D' and any set S of outcomes of the released "
               "model checkpoints, P[M(D) in S] <= e^epsilon P[M(D') in S] + delta")


def weak_delta_warning(delta: float, units: str) -> str | None:
    """A warning for a delta that means little, or None."""
    if delta > WEAK_DELTA:
        return (f"delta = {delta:.3g} is above {WEAK_DELTA:g}: the additive slack delta of the (epsilon, delta) "
                f"guarantee is large here (there are few {units}), so the guarantee means little; it is marked "
                "weak in privacy.json. Use more data owners or set privacy.delta lower.")
    return None


def _segments_text(ledger: Ledger) -> str | None:
    """The mechanism round by round, when the ledger holds more than one (a config changed on resume)."""
    segs = ledger.segments()
    if len({(e.event, e.clip_norm) for _, _, e in segs}) <= 1:
        return None
    parts = []
    for first, last, e in segs:
        ev = e.event
        q, z = ev.sampling_probability, ev.event.noise_multiplier
        c = f", C={e.clip_norm:g}" if e.clip_norm is not None else ""
        parts.append(f"rounds {first}-{last}: q={q:.4g}, z={z:.4g}{c}")
    return "The mechanism changed during the run; per segment of the ledger: " + "; ".join(parts) + "."


def _banded_text(mf: dict, z: float | None, clip_norm: float | None, m: int, entries: int, accountant: str) -> str:
    b = mf["bands"]
    head = (f"Mechanism: banded matrix factorization (Choquette-Choo et al. 2023) with {b} bands: per-user L2 "
            f"clipping to C={clip_norm} (norms in float64), noise correlated across rounds, y = C^-1 w with w "
            f"Gaussian of std {z:.4g}*C per round (drawn in float64 from a CSPRNG-keyed generator) and C the "
            f"unit-column-norm banded Toeplitz matrix of the ledger's coefficients (optimised for the "
            f"{mf['workload']} workload of {mf['rounds']} rounds), divided by {m}; ")
    if mf["sampling"] == "cyclic-poisson":
        return head + (f"b-min-separation cyclic Poisson sampling: client i is in group sha256(i) mod {b} "
                       f"(its own id alone), and round t samples each member of group (t-1) mod {b} with "
                       f"q={mf['group_sampling_rate']:.4g}; each round is charged to its group's account as a "
                       f"Poisson-sampled Gaussian mechanism and epsilon is the largest group's; {entries} ledger "
                       f"entries, {accountant.upper()} accounting.")
    return head + (f"no sampling is assumed: the server admitted each client at most {mf['max_participations']} times "
                   f"and at least {b} rounds apart (it refused the others), so the released rounds are one "
                   f"Gaussian mechanism of sensitivity {mf['sensitivity']:.4g}*C for the whole run (the ledger: "
                   f"each round's increment); {entries} ledger entries, {accountant.upper()} accounting.")


def guarantee_record(
    *,
    mode: str,
    ledger: Ledger,
    epsilon: float | None,
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
    matrix_factorization: dict | None = None,
    pseudo_users: int | None = None,
    with_ledger: bool = True,
    runtime: str | None = None,
    also_not_covered: list[str] | None = None,
) -> dict:
    """The content of ``privacy.json``.

    ``epsilon`` must be ``epsilon_for(ledger, delta, accountant)``: the caller
    computes it once per ledger change (it is the budget check's number) and
    this record is checked against it in tests; ``privlm epsilon --ledger``
    recomputes it from the stored ledger.
    """
    eps = epsilon  # None: not yet recomputed for this ledger (between checkpoints)
    population = population or f"the {num_clients} clients of the data"
    weak = mode != "none" and delta > WEAK_DELTA
    eps_words = f"{eps:.3g}" if eps is not None else "epsilon"
    if mode == "none":
        words = "No differential privacy: this model was trained without clipping or noise."
    elif mode == "example":
        words = (
            f"Example-level (record-level) differential privacy inside each silo: each record of "
            f"silo s is protected with (epsilon_s, {delta:.3g})-DP, {_DEFINITION.replace('epsilon', 'epsilon_s')}, "
            f"where D' adds or removes one record of that silo. "
            + " ".join(f"Silo {s['silo']}: epsilon {s['epsilon']:.3g}." for s in silos or [])
            + f" Mechanism: DP-SGD (Opacus per-record gradients) in each silo, per-record L2 "
            f"clipping to C={clip_norm} (float64 norms and sums; Opacus's float32 factor with ghost "
            f"clipping), Poisson sampling of records with a public rate q, a public "
            f"number of steps per round, Gaussian noise on each step's sum (drawn in float64), divided "
            f"by the public batch size; the server's average of the silos' updates is post-processing; "
            f"{accountant.upper()} accounting. Not protected: a silo's participation or its size, "
            f"and a person with several records is protected only as their records add up "
            f"(group privacy)."
        )
        if seeded_noise:
            words += " WARNING: noise was seeded (test mode); this guarantee does NOT hold."
    elif matrix_factorization:
        words = (f"User-level ({eps_words}, {delta:.3g})-differential privacy: {_DEFINITION}, where D' adds or "
                 f"removes all of the data of one client (user) of the population ({population}). "
                 + _banded_text(matrix_factorization, noise_multiplier, clip_norm, clients_per_round, len(ledger), accountant))
        if eps is None:
            words += " Epsilon is pending until the next checkpoint (`privlm epsilon --ledger privacy.json` computes it now)."
        if ledger.lost:
            words += (f" {ledger.lost} ledger entries belong to rounds lost to a crash and run again (with what "
                      "the repeated rows of the strategy matrix cost); they are counted, paid when the run resumed, "
                      "after the lost release, so they may take epsilon above a budget.")
        if seeded_noise:
            words += " WARNING: noise was seeded (test mode); this guarantee does NOT hold."
    else:
        words = (
            f"User-level ({eps_words}, {delta:.3g})-differential privacy: {_DEFINITION}, where D' adds or "
            f"removes all of the data of one client (user) of the population ({population}). "
            f"Mechanism: Poisson sampling with q={sampling_rate:.4g}, per-user L2 clipping to "
            f"C={clip_norm} (norms in float64), Gaussian noise of std {noise_multiplier:.4g}*C on the sum "
            f"(drawn in float64 from a CSPRNG-keyed generator, then rounded to the parameters' dtype), "
            f"divided by the expected count q*N; {len(ledger)} rounds, {accountant.upper()} accounting."
        )
        if eps is None:
            words += (" Epsilon is recomputed from the ledger at every checkpoint and at the end; "
                      "until then it is pending (`privlm epsilon --ledger privacy.json` computes it now)"
                      + (f" and at most the budget {budget:g}, which every round was checked against." if budget
                         is not None else "."))
        if (seg := _segments_text(ledger)) is not None:
            words += " " + seg
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
        if seeded_noise:
            words += " WARNING: noise was seeded (test mode); this guarantee does NOT hold."
    not_covered = [*NOT_COVERED, *([BANDED_STATE] if matrix_factorization else []), *(also_not_covered or [])]
    if mode != "none":
        covered = "the model checkpoints" + ("" if matrix_factorization else " and the resume state")
        words += (f" Covered: {covered} (and anything computed from them alone). Not covered, as computed "
                  "from clients' data without noise: " + "; ".join(not_covered) + ". Keep those with the operator.")
        if weak:
            words += (f" WEAK: delta = {delta:.3g} is above {WEAK_DELTA:g}; with so few units to protect "
                      "this guarantee means little.")
    return {
        "mode": mode,
        "runtime": runtime,
        "unit": "pseudo-user" if (mode == "user" and pseudo_users) else {"user": "user", "example": "record"}.get(mode),
        "pseudo_users_per_client": pseudo_users,
        "epsilon": eps if eps is not None and math.isfinite(eps) else None,
        "epsilon_pending": eps is None,
        "weak": weak,
        "delta": delta if mode != "none" else None,
        "accountant": accountant,
        "noise_multiplier": noise_multiplier if mode == "user" else None,
        "clip_norm": clip_norm if mode == "user" else None,
        "sampling_rate": sampling_rate,
        "num_clients": num_clients,
        "population": population,
        "adaptive_clipping": adaptive_clipping,
        **({"matrix_factorization": matrix_factorization} if matrix_factorization else {}),  # (banded MF)
        "clients_per_round": clients_per_round,
        "rounds_completed": rounds_completed,
        "rounds_spent": len(ledger),
        "rounds_lost": ledger.lost,
        "budget_epsilon": budget,
        "secure_noise": not seeded_noise,
        "stopped": stopped,
        "covers": ([] if mode == "none" else ["checkpoints/*.safetensors"] if matrix_factorization
                   else ["checkpoints/*.safetensors", "state.safetensors"]),
        "silos": silos,
        "not_covered": not_covered,
        "guarantee": words,
        **({"ledger": ledger.to_list()} if with_ledger else {}),  # (else the caller writes Ledger.to_json())
    }
