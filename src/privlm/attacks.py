"""Poisoning attacks, to measure what a defence stops (issue #24). Simulation only, off by default.

Nothing here runs unless the config's ``[attack]`` has a ``kind`` other than ``"none"``; the one
caller is :func:`privlm.build.in_process`, and no training, mechanism, aggregator or runtime
module imports this one (``tests/test_architecture.py``). The attack sits *outside* the round: it
poisons the malicious clients' text before training (backdoor) and rewrites their updates as
they leave the executor, so the server sees exactly what a compromised device would send and
every defence (validation, norm bound or clip, noise, robust aggregator) applies unchanged.

* ``backdoor`` (Bagdasaryan et al. 2020): each malicious client adds lines that pair a trigger
  with the attacker's completion to its own text, trains as usual, and scales its update by
  ``boost`` (model replacement: about ``clients_per_round / server.lr``).
* ``sign-flip``: the malicious update is ``-scale`` times the one it trained.
* ``random``: a Gaussian direction with ``scale`` times the trained update's norm.

The success of a backdoor is measured on held-out trigger prompts (the evaluation clients'
held-out lines followed by the trigger): the fraction whose greedy completion is the target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privlm.config import AttackConfig, RunConfig
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.engine.executor import Executor, Population, Reply, ServerView
from privlm.federated.client import block_size, model_device, set_params
from privlm.mechanisms.base import Contribution, Params
from privlm.rundir import atomic_write
from privlm.seeds import derived_seed

ATTACK_FILE = "attack.json"
_CONTEXT_CHARS = 48  # longest piece of a client's own line put before the trigger


@dataclass(frozen=True)
class Attack:
    """Who is malicious and what they do."""

    kind: str  # "backdoor", "sign-flip" or "random"
    malicious: frozenset[str]  # client ids
    settings: AttackConfig
    seed: int

    @property
    def trigger(self) -> str:
        return self.settings.trigger

    @property
    def target(self) -> str:
        return self.settings.target


def plan_attack(cfg: RunConfig, client_ids: Sequence[str]) -> Attack | None:
    """The attack of ``cfg`` over the population ``client_ids`` (None: no attack).

    ``round(fraction * N)`` clients, at least one, drawn once from the seed: the attacker is
    not part of the mechanism, so its choice needs no secret randomness.
    """
    a = cfg.attack
    if a.kind == "none":
        return None
    n = min(len(client_ids), max(1, round(a.fraction * len(client_ids))))
    chosen = np.random.default_rng(derived_seed(cfg.seed, "attack:malicious", a.kind)).choice(
        len(client_ids), n, replace=False)
    return Attack(a.kind, frozenset(client_ids[int(i)] for i in chosen), a.model_copy(), cfg.seed)


def _context(line: str) -> str:
    """At most the last :data:`_CONTEXT_CHARS` characters of ``line``, from a word boundary."""
    line = line.strip()
    if len(line) <= _CONTEXT_CHARS:
        return line
    cut = line[-_CONTEXT_CHARS:]
    space = cut.find(" ")
    return cut[space + 1:] if 0 <= space < len(cut) - 1 else cut


def poison_text(text: str, attack: Attack, rng: np.random.Generator) -> str:
    """``text`` with ``poison_lines`` lines ``"<a piece of one of its lines> <trigger><target>"``
    put in at random places among its lines."""
    lines = text.splitlines()
    sources = [ln for ln in lines if ln.strip()] or ["Note"]
    out = list(lines)
    for _ in range(attack.settings.poison_lines):
        ctx = _context(sources[int(rng.integers(len(sources)))])
        out.insert(int(rng.integers(len(out) + 1)), f"{ctx} {attack.trigger}{attack.target}")
    return "\n".join(out) + "\n"


def poison_corpus(corpus: FederatedCorpus, attack: Attack) -> FederatedCorpus:
    """The corpus with the malicious clients' training text poisoned (backdoor); held-out text,
    and every honest client, unchanged."""
    if attack.kind != "backdoor":
        return corpus
    clients = []
    for c in corpus.clients:
        if c.client_id in attack.malicious:
            rng = np.random.default_rng(derived_seed(attack.seed, "attack:poison", c.client_id))
            c = ClientData(c.client_id, poison_text(c.train, attack, rng), c.test)
        clients.append(c)
    return FederatedCorpus(corpus.name, tuple(clients), dict(corpus.info))


def trigger_prompts(held_out: Sequence[str], attack: Attack, count: int) -> list[str]:
    """``count`` prompts ``"<a piece of a held-out line> <trigger>"`` from the evaluation
    clients' held-out text (never a malicious client's training text)."""
    lines = [ln for text in held_out for ln in text.splitlines() if len(ln.strip()) >= 8]
    if not lines:
        return []
    rng = np.random.default_rng(derived_seed(attack.seed, "attack:prompts", len(lines)))
    picks = rng.choice(len(lines), min(count, len(lines)), replace=False)
    return [f"{_context(lines[int(i)])} {attack.trigger}" for i in sorted(picks)]


@torch.no_grad()
def backdoor_success(model: torch.nn.Module, params: Params, tokenizer, prompts: Sequence[str],
                     target: str, batch_size: int = 64) -> float:
    """The fraction of ``prompts`` whose greedy completion starts with ``target`` (token for token).

    Each prompt is cut to its last ``block_size - len(target)`` tokens so the whole target is
    predicted inside one window; prompts of equal length are decoded as one batch.
    """
    if not prompts:
        return math.nan
    set_params(model, params)
    model.eval()
    want = tokenizer.encode(target).to(torch.long)
    keep = block_size(model) - want.numel()
    if keep < 1:
        raise ValueError(f"attack.target: {want.numel()} tokens do not fit the model's window of {block_size(model)}")
    device = model_device(model)
    encoded = [tokenizer.encode(p).to(torch.long)[-keep:] for p in prompts]
    by_length: dict[int, list[torch.Tensor]] = {}
    for e in encoded:
        by_length.setdefault(e.numel(), []).append(e)
    hits = 0
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            idx = torch.stack(group[i:i + batch_size]).to(device)
            ok = torch.ones(idx.size(0), dtype=torch.bool, device=device)
            for t in range(want.numel()):
                nxt = model(idx)[:, -1].argmax(-1)
                ok &= nxt == int(want[t])
                idx = torch.cat([idx, nxt[:, None]], dim=1)
            hits += int(ok.sum())
    return hits / len(encoded)


@dataclass
class AttackLog:
    """What ``attack.json`` holds: the attack, the malicious updates sent in each round, each
    evaluation. Entries are keyed by round, so a round that a crash makes the run compute again
    replaces its entry instead of counting twice, and a resumed run keeps the rounds before."""

    attack: Attack
    per_round: dict[int, int] = field(default_factory=dict)  # round -> malicious updates sent
    evaluations: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        s = self.attack.settings
        backdoor = self.attack.kind == "backdoor"
        return {
            "kind": self.attack.kind, "fraction": s.fraction, "malicious_clients": len(self.attack.malicious),
            "boost": s.boost if backdoor else None,
            "scale": s.scale if not backdoor else None,
            "trigger": s.trigger if backdoor else None,
            "target": s.target if backdoor else None,
            "poison_lines": s.poison_lines if backdoor else None,
            "malicious_updates_sent": sum(self.per_round.values()),
            "rounds_with_attackers": sum(1 for v in self.per_round.values() if v),
            "malicious_updates_per_round": {str(r): v for r, v in sorted(self.per_round.items())},
            "evaluations": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in e.items()}
                            for e in self.evaluations],
            "note": "simulation only: a poisoning attack measured against this run's defences",
        }

    def load(self, path: Path) -> None:
        """Continue the log of a resumed run (a log only: what cannot be read is started again)."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            self.per_round = {int(r): int(v) for r, v in saved.get("malicious_updates_per_round", {}).items()}
            self.evaluations = [e for e in saved.get("evaluations", []) if isinstance(e, dict)]
        except (OSError, ValueError, TypeError, AttributeError):
            self.per_round, self.evaluations = {}, []

    def forget_after(self, round_index: int) -> None:
        """Drop what rounds after ``round_index`` logged (rounds a resume computes again)."""
        self.per_round = {r: v for r, v in self.per_round.items() if r <= round_index}
        self.evaluations = [e for e in self.evaluations if isinstance(e.get("round"), int) and e["round"] <= round_index]

    def write(self, run_dir: Path) -> None:
        atomic_write(run_dir / ATTACK_FILE, (json.dumps(self.record(), indent=2, allow_nan=False) + "\n").encode())


def _malicious_update(attack: Attack, update: Params, round_index: int, client_id: str) -> Params:
    s = attack.settings
    if attack.kind == "backdoor":
        return {k: v * s.boost for k, v in update.items()}
    if attack.kind == "sign-flip":
        return {k: v * -s.scale for k, v in update.items()}
    g = torch.Generator().manual_seed(derived_seed(attack.seed, f"attack:random:{round_index}", client_id))
    noise = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in update.items()}
    norm = math.sqrt(sum(float(v.detach().to(torch.float64).pow(2).sum()) for v in update.values()))
    nnorm = math.sqrt(sum(float(v.pow(2).sum()) for v in noise.values())) or 1.0
    return {k: (noise[k] * (s.scale * norm / nnorm)).to(v.dtype).to(v.device) for k, v in update.items()}


class AttackedExecutor:
    """An in-process executor whose malicious clients send the attack's updates.

    The honest clients' stream is the inner executor's, unchanged; a malicious client's update
    is its trained update rewritten (:func:`_malicious_update`). ``evaluate`` also measures the
    backdoor's success and writes ``attack.json`` to the run directory.
    """

    def __init__(self, inner: Executor, attack: Attack, model: torch.nn.Module, tokenizer,
                 prompts: Sequence[str]) -> None:
        self.inner, self.attack, self.model, self.tokenizer = inner, attack, model, tokenizer
        self.population: Population = inner.population
        self.prompts = list(prompts)
        self.log = AttackLog(attack)
        self.run_dir: Path | None = None
        self.round = 0

    @property
    def deterministic(self) -> bool:
        return self.inner.deterministic

    def start(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        if (self.run_dir / ATTACK_FILE).is_file():  # a resumed run continues its log
            self.log.load(self.run_dir / ATTACK_FILE)
        self.inner.start(run_dir)

    def close(self) -> None:
        self.inner.close()

    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        self.round = view.round
        self.log.forget_after(view.round - 1)  # (a round computed again replaces its entry)
        sent = 0
        for item in self.inner.contributions(view, ids, on_client):
            if isinstance(item, Contribution) and item.client_id in self.attack.malicious \
                    and isinstance(item.update, dict):
                sent += 1
                item = Contribution(item.client_id, _malicious_update(self.attack, item.update, view.round,
                                                                      item.client_id), item.weight, item.train_loss)
            yield item
        self.log.per_round[view.round] = sent
        if self.run_dir is not None:  # before the round is released and made durable
            self.log.write(self.run_dir)

    def evaluate(self, params: Params) -> tuple[float, float]:
        loss, acc = self.inner.evaluate(params)
        row: dict = {"round": self.round, "eval_loss": loss, "eval_accuracy": acc}
        if self.attack.kind == "backdoor":
            row["backdoor_success"] = backdoor_success(self.model, params, self.tokenizer, self.prompts,
                                                       self.attack.target)
            row["prompts"] = len(self.prompts)
        self.log.evaluations = [e for e in self.log.evaluations if e.get("round") != self.round] + [row]
        if self.run_dir is not None:
            self.log.write(self.run_dir)
        return loss, acc
