"""Privacy audit: try to break the guarantee of a finished run.

``[audit] canaries = M`` plants, before training, M random secrets such as
``my patient record number is 3 9 1 7 4 0 2 8 5 1`` (10^10 possibilities), each
assigned to one random client and *included* with probability 1/2 (the one-run
design of Steinke, Nasr and Jagielski 2023). A fraction of the clients
(``holdout_fraction``) is kept out of training for membership inference.
``RUN_DIR/audit/canaries.json`` records both; it is secret material (the
planted secrets and who holds them) and is written with owner-only permissions.

``privlm audit RUN_DIR`` then runs four attacks (:func:`run_audit`):

1. **Exposure** (Carlini et al. 2019, "The Secret Sharer"): the canary's
   negative log-likelihood ranked among R random reference secrets of the same
   format; exposure = log2 R - log2 rank, and a skew-normal fit of the
   references' NLLs extrapolates to the whole secret space.
2. **One-run ε lower bound** (Steinke et al. 2023): guess "included" for the
   k+ lowest-NLL canaries and "excluded" for the k- highest, and report the
   largest ε such that that many correct guesses still has p ≥ 0.05 under
   (ε, δ)-DP. If it exceeds the claimed ε, the implementation is broken.
   Neighbouring relation: a text canary is added to an *existing* client's
   text, so "included" vs "excluded" differ by modifying one user (replace-one),
   while the claim is add/remove-one. By group privacy such a pair is only
   (2ε, (1 + e^ε)δ)-DP, so the right upper bound for this experiment lies
   between ε and 2ε. Comparing with ε itself is the stricter test: it can raise
   a false alarm, but never passes a run whose canaries break the bound that
   actually applies. (White-box update canaries are extra users: add/remove.)
3. **User-level membership inference**: mean per-token loss on each client's
   training text, training clients vs held-out clients: ROC AUC and TPR at 1% FPR.
4. **PII in generations**: K samples from prompts that precede PII in the
   training text (before scrubbing); PII found in them by privlm's Presidio
   detector, and how much of it occurs verbatim in the training text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets as _secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.errors import DataError

if TYPE_CHECKING:
    from privlm.data.scrub import ScrubSettings

CANARY_FILE = Path("audit") / "canaries.json"
AUDIT_FILE = "audit.json"
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class Canary:
    client_id: str
    secret: str  # the digits, e.g. "3917402851"
    included: bool


@dataclass(frozen=True)
class AuditPlan:
    """What the audit planted before training: canaries, and the clients kept out."""

    canary_format: str
    secret_digits: int
    repeats: int
    canaries: tuple[Canary, ...]
    holdout: tuple[str, ...]
    # White-box canaries: extra users whose update is a fixed random direction of norm C.
    update_included: tuple[bool, ...] = ()
    update_seed: int = 0  # secret: the directions follow from it

    def text(self, secret: str) -> str:
        return self.canary_format.format(secret=" ".join(secret))

    @property
    def prefix(self) -> str:
        return self.canary_format.split("{secret}")[0]


def draw_plan(client_ids: list[str], canaries: int, canary_format: str, secret_digits: int,
              repeats: int, holdout_fraction: float, seed: int | None, update_canaries: int = 0) -> AuditPlan:
    """Hold out clients, then draw canaries for the rest; secure randomness unless ``seed``."""
    rng = np.random.default_rng(_secrets.randbits(128) if seed is None else [seed, 7, 7])
    n_hold = int(round(holdout_fraction * len(client_ids)))
    order = rng.permutation(len(client_ids))
    holdout = tuple(sorted(client_ids[i] for i in order[:n_hold]))
    members = [client_ids[i] for i in sorted(order[n_hold:])]
    if canaries and not members:
        raise DataError("audit: no training clients left to hold canaries")
    drawn = []
    for _ in range(canaries):
        secret = "".join(str(d) for d in rng.integers(0, 10, secret_digits))
        drawn.append(Canary(members[int(rng.integers(len(members)))], secret, bool(rng.integers(2))))
    update_included = tuple(bool(b) for b in rng.integers(2, size=update_canaries))
    return AuditPlan(canary_format, secret_digits, repeats, tuple(drawn), holdout, update_included,
                     int(rng.integers(2**62)))


def update_direction(plan: AuditPlan, k: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Update canary ``k``'s direction: Gaussian over the trainable parameters, unit L2 norm."""
    g = torch.Generator().manual_seed((plan.update_seed + 1_000_003 * (k + 1)) % 2**63)
    parts = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in sorted(shapes.items())}
    norm = math.sqrt(sum(float((t * t).sum()) for t in parts.values()))
    return {name: t / norm for name, t in parts.items()}


def scatter_lines(text: str, extra: list[str], key: str) -> str:
    """``text`` with each line of ``extra`` inserted at its own random line boundary.

    The Secret Sharer plants canaries at random places in the training data. Copies
    of a canary placed one after another would let a model learn to *copy* the
    secret from the previous line rather than memorise it after the prefix (what
    exposure measures). Positions are a fixed function of ``key`` and the lines, so
    a resumed run rebuilds exactly the same corpus.
    """
    lines = text.split("\n")
    digest = hashlib.sha256("\x00".join([key, *extra]).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    # Boundary b means "before lines[b]" (b = len(lines): at the end); one copy per boundary
    # while there are enough of them, so a client line separates any two copies.
    slots = rng.choice(len(lines) + 1, size=len(extra), replace=len(extra) > len(lines) + 1)
    at: dict[int, list[str]] = {}
    for slot, line in zip(slots.tolist(), extra):
        at.setdefault(slot, []).append(line)
    out: list[str] = []
    for b in range(len(lines) + 1):
        out.extend(at.get(b, []))
        if b < len(lines):
            out.append(lines[b])
    return "\n".join(out)


def apply_plan(corpus: FederatedCorpus, plan: AuditPlan) -> FederatedCorpus:
    """The corpus without the held-out clients, with included canaries scattered through their clients' text."""
    lines: dict[str, list[str]] = {}
    for c in plan.canaries:
        if c.included:
            lines.setdefault(c.client_id, []).extend([plan.text(c.secret)] * plan.repeats)
    held = set(plan.holdout)
    clients = []
    for cl in corpus.clients:
        if cl.client_id in held:
            continue
        extra = lines.get(cl.client_id)
        clients.append(ClientData(cl.client_id, scatter_lines(cl.train, extra, cl.client_id), cl.test)
                       if extra else cl)
    return FederatedCorpus(corpus.name, tuple(clients), {**corpus.info, "audit_holdout": len(held),
                                                         "audit_canaries_included": sum(c.included for c in plan.canaries)})


def save_plan(run_dir: Path, plan: AuditPlan) -> None:
    from privlm.rundir import atomic_write

    path = Path(run_dir) / CANARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    record = {"secret_material": "planted secrets and the clients holding them; do not share",
              **asdict(plan)}
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())
    os.chmod(path, 0o600)


def load_plan(run_dir: Path) -> AuditPlan | None:
    from privlm.rundir import read_json

    path = Path(run_dir) / CANARY_FILE
    if not path.exists():
        return None
    d = read_json(path)
    try:
        return AuditPlan(d["canary_format"], int(d["secret_digits"]), int(d["repeats"]),
                         tuple(Canary(c["client_id"], str(c["secret"]), bool(c["included"])) for c in d["canaries"]),
                         tuple(d["holdout"]), tuple(bool(b) for b in d.get("update_included", ())),
                         int(d.get("update_seed", 0)))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: not a privlm canary file") from None


# --------------------------------------------------------------------------- statistics


def exposure_from_rank(rank: int, references: int) -> float:
    """log2 R - log2 rank: a canary ranked first among R references has exposure log2 R."""
    return math.log2(references) - math.log2(rank)


def rank_among(nll: float, reference_nll: np.ndarray) -> int:
    """1 + the number of references more likely than the canary (lower NLL)."""
    return 1 + int(np.sum(reference_nll < nll))


def exposure_extrapolated(nll: float, reference_nll: np.ndarray, space_bits: float) -> float:
    """-log2 of the fitted skew-normal CDF at the canary's NLL (Carlini et al. 2019, sec. 4.3),
    capped at the size of the secret space."""
    from scipy.stats import skewnorm

    a, loc, scale = skewnorm.fit(reference_nll)
    logcdf = skewnorm.logcdf(nll, a, loc, scale)
    return float(min(space_bits, max(0.0, -logcdf / math.log(2))))


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (eps, delta)-DP with m canaries
    (Steinke, Nasr, Jagielski 2023, Theorem 3.1 / their Algorithm's p-value)."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, total = 0.0, 0.0
    if delta > 0:
        for i in range(1, v + 1):
            total += float(binom.pmf(v - i, r, q))
            alpha = max(alpha, total / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = CONFIDENCE) -> float:
    """The largest ε at which v correct of r guesses still has p-value ≥ 1 - confidence."""
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= 1 - confidence:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < 1 - confidence:
        lo, hi = hi, hi * 2
        if hi > 100:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def auc_and_tpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = 0.01) -> tuple[float, float]:
    """ROC AUC (Mann-Whitney) of scores where higher means member, and TPR at the given FPR."""
    from scipy.stats import rankdata

    scores = np.concatenate([member, nonmember])
    ranks = rankdata(scores)
    n1, n0 = len(member), len(nonmember)
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    threshold = np.quantile(nonmember, 1 - fpr, method="higher")
    return float(auc), float(np.mean(member > threshold))


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def sequence_nll(model: torch.nn.Module, tok, texts: list[str], prefix: str, batch_size: int = 256) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Sum of -log p (nats) of each text's tokens after ``prefix``, given what precedes them."""
    n_prefix = len(tok.encode("\n" + prefix))
    out = np.zeros(len(texts))
    by_len: dict[int, list[int]] = {}
    encoded = [tok.encode("\n" + t) for t in texts]
    for i, ids in enumerate(encoded):
        by_len.setdefault(int(ids.numel()), []).append(i)
    block = model.cfg.block_size
    for length, idx in by_len.items():
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            ids = torch.stack([encoded[i] for i in part])[:, -(block + 1):]  # the model's window at most
            start = max(1, n_prefix - (length - ids.size(1)))
            logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)
            token_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            out[part] = (-token_lp[:, start - 1:].sum(dim=1)).numpy()
    return out


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, tok, text: str, max_tokens: int = 2048) -> float:  # type: ignore[no-untyped-def]
    ids = tok.encode(text)[:max_tokens + 1]
    if ids.numel() < 2:
        return math.nan
    block = model.cfg.block_size
    windows = [ids[i:i + block + 1] for i in range(0, ids.numel() - 1, block)]
    total, count = 0.0, 0
    for w in windows:
        if w.numel() < 2:
            continue
        logits = model(w[:-1].unsqueeze(0)).float()
        loss = torch.nn.functional.cross_entropy(logits[0], w[1:], reduction="sum")
        total += float(loss)
        count += w.numel() - 1
    return total / count


# --------------------------------------------------------------------------- the audit


def run_audit(run_dir: Path, references: int = 2000, generations: int = 50, guesses: int | None = None,
              mia_clients: int = 500, seed: int | None = None) -> dict:
    """Run the four attacks on ``run_dir``; write ``audit.json`` and the report's audit section."""
    from privlm.data import corpus_of
    from privlm.data.scrub import settings_for_run
    from privlm.inference import load_run_model
    from privlm.rundir import atomic_write, open_run_dir

    rd = open_run_dir(run_dir)
    rounds, model, tok, cfg = load_run_model(rd.path)
    privacy = rd.read_privacy()
    plan = load_plan(rd.path)
    rng = np.random.default_rng(seed if seed is not None else _secrets.randbits(128))
    torch_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    claimed = privacy.get("epsilon")
    delta = privacy.get("delta") or 0.0
    if claimed is None and privacy.get("epsilon_pending"):  # between checkpoints: the ledger's own epsilon
        from privlm.privacy import Ledger, epsilon_for

        try:
            claimed = epsilon_for(Ledger.from_list(privacy.get("ledger"), mode=privacy.get("mode")), delta,
                                  privacy.get("accountant", "pld"))
        except ValueError as e:
            raise DataError(f"{rd.privacy_path}: bad ledger ({e})") from None
    result: dict = {"run_dir": str(rd.path), "round": rounds, "claimed_epsilon": claimed, "delta": delta,
                    "mode": privacy.get("mode"), "unit": privacy.get("unit"),
                    "neighbouring_relation": {
                        "claim": "add/remove one unit",
                        "text_canaries": "modify one user (replace-one): the bound that applies is at most "
                                         "2 x claimed_epsilon by group privacy; compared with claimed_epsilon "
                                         "itself, the stricter test",
                        "update_canaries": "add/remove one user"}}

    bounds = []
    result["canaries"] = None
    if plan is not None and plan.canaries:
        result["canaries"] = _canary_attacks(model, tok, plan, references, guesses, delta, rng)
        bounds.append(result["canaries"]["one_run"]["epsilon_lower_bound"])
    result["update_canaries"] = None
    if plan is not None and plan.update_included:
        result["update_canaries"] = _update_canary_attack(rd, model, plan, guesses, delta)
        bounds.append(result["update_canaries"]["one_run"]["epsilon_lower_bound"])
    result["epsilon_lower_bound"] = max(bounds) if bounds else None
    result["broken"] = bool(claimed is not None and bounds and max(bounds) > claimed)

    raw = corpus_of(cfg)  # before scrubbing
    if plan is not None and plan.holdout:
        result["membership"] = _membership(model, tok, raw, plan, mia_clients, rng, settings_for_run(cfg))
    else:
        result["membership"] = None
    result["pii"] = _pii_leakage(model, tok, raw, plan, generations, cfg, rng, torch_gen) if generations else None

    atomic_write(rd.path / AUDIT_FILE, (json.dumps(result, indent=2, default=_json_default) + "\n").encode())
    from privlm.report.html import write_report

    write_report(rd)
    return result


def _json_default(x):  # type: ignore[no-untyped-def]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


def _canary_attacks(model, tok, plan: AuditPlan, references: int, guesses: int | None,  # type: ignore[no-untyped-def]
                    delta: float, rng: np.random.Generator) -> dict:
    canary_nll = sequence_nll(model, tok, [plan.text(c.secret) for c in plan.canaries], plan.prefix)
    ref_secrets = ["".join(str(d) for d in rng.integers(0, 10, plan.secret_digits)) for _ in range(references)]
    ref_nll = sequence_nll(model, tok, [plan.text(s) for s in ref_secrets], plan.prefix)
    space_bits = plan.secret_digits * math.log2(10)
    rows = []
    for c, nll in zip(plan.canaries, canary_nll, strict=True):
        rank = rank_among(float(nll), ref_nll)
        rows.append({"included": c.included, "nll": float(nll), "rank": rank,
                     "exposure": exposure_from_rank(rank, references),
                     "exposure_extrapolated": exposure_extrapolated(float(nll), ref_nll, space_bits)})

    def mean(key: str, included: bool) -> float | None:
        xs = [r[key] for r in rows if r["included"] == included]
        return float(np.mean(xs)) if xs else None

    # One-run audit: the lowest NLL (highest score) -> guess included; the highest -> excluded.
    one_run = _one_run(-canary_nll, [c.included for c in plan.canaries], guesses, delta)
    m = len(rows)
    return {
        "count": m, "included": sum(c.included for c in plan.canaries), "references": references,
        "space_bits": space_bits,
        "exposure": {"included_mean": mean("exposure", True), "excluded_mean": mean("exposure", False),
                     "included_mean_extrapolated": mean("exposure_extrapolated", True),
                     "excluded_mean_extrapolated": mean("exposure_extrapolated", False)},
        "one_run": one_run,
        "per_canary": rows,
    }


def _one_run(scores: np.ndarray, included: list[bool], guesses: int | None, delta: float) -> dict:
    """Guess "included" for the k+ highest scores, "excluded" for the k- lowest; abstain in between."""
    m = len(scores)
    k = min(m, guesses if guesses is not None else max(2, m // 5))
    k_in, k_out = (k + 1) // 2, k // 2
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:k_in], order[m - k_out:] if k_out else order[:0]
    correct = int(sum(included[i] for i in guessed_in) + sum(not included[i] for i in guessed_out))
    return {"guesses": k_in + k_out, "guessed_included": k_in, "guessed_excluded": k_out, "correct": correct,
            "confidence": CONFIDENCE, "delta": delta,
            "epsilon_lower_bound": epsilon_lower_bound(m, k_in + k_out, correct, delta)}


def _update_canary_attack(rd, model, plan: AuditPlan, guesses: int | None, delta: float) -> dict:  # type: ignore[no-untyped-def]
    """White-box: score = <final - initial parameters, canary direction>."""
    from safetensors.torch import load_file

    from privlm.federated.client import get_params
    from privlm.models.factory import from_checkpoint

    first = from_checkpoint(model, load_file(rd.checkpoint_path(0)))
    final = get_params(model)
    shapes = {k: v.shape for k, v in final.items()}
    delta_params = {k: final[k].double() - first[k].double() for k in final}
    scores = np.array([sum(float((delta_params[n] * u).sum()) for n, u in update_direction(plan, k, shapes).items())
                       for k in range(len(plan.update_included))])
    inc = list(plan.update_included)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
    return {"count": len(inc), "included": sum(inc),
            "score_included_mean": mean(scores[np.array(inc, dtype=bool)]),
            "score_excluded_mean": mean(scores[~np.array(inc, dtype=bool)]),
            "one_run": _one_run(scores, inc, guesses, delta)}


def _membership(model, tok, raw: FederatedCorpus, plan: AuditPlan, n: int, rng: np.random.Generator,  # type: ignore[no-untyped-def]
                scrub: ScrubSettings | None) -> dict:
    from privlm.data.scrub import scrub_corpus

    held = set(plan.holdout)
    members = [c for c in raw.clients if c.client_id not in held]
    nonmembers = [c for c in raw.clients if c.client_id in held]
    pick = lambda xs: [xs[i] for i in sorted(rng.permutation(len(xs))[:n])]  # noqa: E731
    members, nonmembers = pick(members), pick(nonmembers)
    if scrub is not None:  # attack the text as the model was trained on it
        members, nonmembers = (list(scrub_corpus(FederatedCorpus(raw.name, tuple(xs)), scrub, progress=False)[0].clients)
                               for xs in (members, nonmembers))
    # Score: higher = more likely a member (lower loss on the client's own training text).
    m_scores = np.array([-mean_token_loss(model, tok, c.train) for c in members])
    n_scores = np.array([-mean_token_loss(model, tok, c.train) for c in nonmembers])
    m_scores, n_scores = m_scores[~np.isnan(m_scores)], n_scores[~np.isnan(n_scores)]
    if not len(m_scores) or not len(n_scores):
        return {"members": len(m_scores), "nonmembers": len(n_scores), "auc": None, "tpr_at_1pct_fpr": None}
    auc, tpr = auc_and_tpr(m_scores, n_scores)
    return {"members": len(m_scores), "nonmembers": len(n_scores), "auc": auc, "tpr_at_1pct_fpr": tpr,
            "member_loss_mean": float(-m_scores.mean()), "nonmember_loss_mean": float(-n_scores.mean())}


def _pii_leakage(model, tok, raw: FederatedCorpus, plan: AuditPlan | None, k: int, cfg,  # type: ignore[no-untyped-def]
                 rng: np.random.Generator, gen: torch.Generator, prompt_chars: int = 40, new_tokens: int = 48) -> dict:
    from collections import Counter

    from privlm.models.transformer import sample
    from privlm.pii import Detector

    detector = Detector(spacy_model=cfg.data.scrub.spacy_model)
    held = set(plan.holdout) if plan else set()
    training = [c for c in raw.clients if c.client_id not in held]
    train_text = "\n".join(c.train for c in training)
    prompts: list[tuple[str, str]] = []  # (prompt, the PII that followed it)
    for ci in rng.permutation(len(training)):
        lines = [ln for ln in training[int(ci)].train.split("\n") if ln.strip()]
        if not lines:
            continue
        line = lines[int(rng.integers(len(lines)))]
        found = [f for f in detector.find(line) if f[1] >= 8]
        if not found:
            continue
        etype, start, end = found[int(rng.integers(len(found)))]
        prompts.append((line[max(0, start - prompt_chars):start], line[start:end]))
        if len(prompts) >= k:
            break
    found_types: Counter[str] = Counter()
    verbatim, exact = 0, 0
    for prompt, truth in prompts:
        ids = tok.encode("\n" + prompt).unsqueeze(0)
        out = sample(model, ids, model.cfg.block_size, new_tokens, temperature=1.0, top_k=None, generator=gen)
        text = tok.decode(out[0, ids.size(1):]).split("\n")[0]
        for etype, s, e in detector.find(text):
            value = text[s:e]
            found_types[etype] += 1
            in_train = len(value) >= 4 and value in train_text
            verbatim += in_train
            exact += value == truth
    return {"generations": len(prompts), "new_tokens": new_tokens, "pii_found": sum(found_types.values()),
            "pii_found_by_type": dict(sorted(found_types.items())), "verbatim_in_training_text": verbatim,
            "exact_continuation": exact}
