"""What privacy.json claims, against what the run did (issue #18: points 3, 4, 6, 7)."""

from __future__ import annotations

import json
import logging

import pytest

from privlm.config import load_config
from privlm.privacy import Ledger, epsilon_for
from privlm.privacy.guarantee import NOT_COVERED, WEAK_DELTA
from privlm.rundir import RunDir
from privlm.api import Simulation
from privlm.build import resolve_privacy

TINY = ["data.num_clients=60", "federation.clients_per_round=6", "federation.rounds=5",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
        "client.local_steps=1", "eval.max_clients=4", "privacy.noise_multiplier=1.0",
        "privacy.seeded_noise=true", "data.scrub.enabled=false", "output.checkpoint_every=2"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every privacy.json a 5-round run writes, in order, and the run's result."""
    records: list[dict] = []
    original = RunDir.write_privacy

    def spy(self, record, ledger_json=None):
        original(self, record, ledger_json)
        records.append(json.loads(self.privacy_path.read_text()))  # as written

    RunDir.write_privacy = spy
    try:
        res = Simulation(load_config(None, TINY)).run(tmp_path_factory.mktemp("g") / "run", progress=False)
    finally:
        RunDir.write_privacy = original
    return records, res


def test_every_stated_epsilon_is_the_ledgers_and_pending_ones_say_so(written):
    records, res = written
    for rec in records:
        ledger = Ledger.from_list(rec["ledger"], mode="user")
        if rec["epsilon_pending"]:
            assert rec["epsilon"] is None and "pending" in rec["guarantee"]
        else:
            assert rec["epsilon"] == epsilon_for(ledger, rec["delta"], "pld")
    # exact wherever a checkpoint is released (rounds 2 and 4) and at the end (round 5);
    # pending while rounds 1 and 3 (paid, not checkpointed) are the newest entries
    exact = {len(rec["ledger"]) for rec in records if not rec["epsilon_pending"]}
    pending = {len(rec["ledger"]) for rec in records if rec["epsilon_pending"]}
    assert exact == {0, 2, 4, 5} and pending == {1, 2, 3, 4, 5}
    assert not records[-1]["epsilon_pending"] and res.epsilon == records[-1]["epsilon"]
    assert [m["epsilon"] is not None for m in res.metrics] == [False, True, False, True, True]


def test_the_text_uses_the_additive_definition_and_names_what_is_not_covered(written):
    rec = written[0][-1]
    text = rec["guarantee"]
    assert "P[M(D) in S] <= e^epsilon P[M(D') in S] + delta" in text
    assert "except with probability" not in text
    assert "drawn in float64" in text and "divided by the expected count q*N" in text
    for name in ("metrics.jsonl", "scrub.json", "audit.json", "report.html", "logs"):
        assert any(name in item for item in rec["not_covered"]), name
        assert name in text
    assert rec["not_covered"] == NOT_COVERED
    assert "state.safetensors" in rec["covers"]


def test_a_delta_that_means_little_is_warned_about_and_marked_weak(written, caplog):
    rec = written[0][-1]  # N = 60: delta = 60^-1.1 = 0.011
    assert rec["delta"] > WEAK_DELTA and rec["weak"] is True and "WEAK: delta = 0.011" in rec["guarantee"]
    with caplog.at_level(logging.WARNING):
        resolve_privacy(load_config(None, [*TINY, "federation.clients_per_round=2"]), 3)  # N = 3: delta = 0.30
    assert any("delta = 0.299 is above 0.001" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cfg, resolved = resolve_privacy(load_config(None, [*TINY, "privacy.delta=1e-6"]), 60)
    assert cfg.privacy.delta == resolved.delta == 1e-6 and not any("above 0.001" in r.message for r in caplog.records)
