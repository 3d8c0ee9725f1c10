"""The privacy audit: its statistics, its canaries, and that it catches a broken mechanism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from privlm import audit
from privlm.cli import app
from privlm.config import load_config
from privlm.data.corpus import ClientData, FederatedCorpus
from privlm.errors import ConfigError, DataError


def test_exposure_of_a_canary_ranked_first_is_log2_r():
    refs = np.array([5.0, 6.0, 7.0, 8.0])
    assert audit.rank_among(1.0, refs) == 1
    assert audit.exposure_from_rank(1, 4096) == pytest.approx(12.0)
    assert audit.exposure_from_rank(audit.rank_among(6.5, refs), 4) == pytest.approx(math.log2(4) - math.log2(3))


def test_extrapolated_exposure_grows_as_the_canary_gets_likelier():
    refs = np.random.default_rng(0).normal(20, 2, 5000)
    typical = audit.exposure_extrapolated(20.0, refs, 33.2)
    rare = audit.exposure_extrapolated(10.0, refs, 33.2)
    assert 0.5 < typical < 1.5 and rare > 10 and audit.exposure_extrapolated(-1e6, refs, 33.2) == 33.2


@pytest.mark.parametrize("r,v,expected", [(100, 100, 3.49), (1000, 1000, 5.81), (100, 90, 1.63), (1000, 750, 0.98)])
def test_one_run_binomial_bound_at_delta_zero(r, v, expected):
    assert audit.epsilon_lower_bound(r, r, v, delta=0.0) == pytest.approx(expected, abs=0.01)


def test_one_run_bound_is_zero_for_chance_and_lower_with_delta():
    assert audit.epsilon_lower_bound(100, 100, 50) == 0.0
    assert audit.epsilon_lower_bound(1000, 100, 100, delta=1e-3) < audit.epsilon_lower_bound(1000, 100, 100)


def test_auc_and_tpr():
    assert audit.auc_and_tpr(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == (1.0, 1.0)
    auc, _ = audit.auc_and_tpr(np.arange(100.0), np.arange(100.0))
    assert auc == pytest.approx(0.5)


def test_draw_and_apply_plan():
    ids = [f"c{i}" for i in range(50)]
    plan = audit.draw_plan(ids, 40, "code {secret} end", 8, 2, 0.2, seed=1)
    assert plan == audit.draw_plan(ids, 40, "code {secret} end", 8, 2, 0.2, seed=1)
    assert audit.draw_plan(ids, 40, "code {secret} end", 8, 2, 0.2, seed=None) != plan
    assert len(plan.holdout) == 10 and not set(plan.holdout) & {c.client_id for c in plan.canaries}
    assert 5 < sum(c.included for c in plan.canaries) < 35 and all(len(c.secret) == 8 for c in plan.canaries)
    corpus = FederatedCorpus("t", tuple(ClientData(i, f"text of {i}", "test") for i in ids))
    planted = audit.apply_plan(corpus, plan)
    assert planted.num_clients == 40
    text = "\n".join(c.train for c in planted.clients)
    for c in plan.canaries:
        line = plan.text(c.secret)
        assert text.count(line) == (2 if c.included else 0)
        if c.included:
            assert line in next(cl.train for cl in planted.clients if cl.client_id == c.client_id)
    assert plan.text("1234") == "code 1 2 3 4 end" and plan.prefix == "code "


def test_canary_copies_are_scattered_not_stacked():
    """Stacked copies would let a model copy the secret from the line above instead of memorising it."""
    text = "\n".join(f"note line {i}" for i in range(30))
    out = audit.scatter_lines(text, ["SECRET"] * 10, "patient-7")
    lines = out.split("\n")
    assert [x for x in lines if x != "SECRET"] == text.split("\n")  # the client's text, in order
    assert lines.count("SECRET") == 10
    assert not any(a == b == "SECRET" for a, b in zip(lines, lines[1:]))  # a client line between copies
    assert out == audit.scatter_lines(text, ["SECRET"] * 10, "patient-7")  # resume rebuilds the same corpus
    assert out != audit.scatter_lines(text, ["SECRET"] * 10, "patient-8")


def test_audit_config_errors():
    with pytest.raises(ConfigError, match=r"audit\.canary_format: must be one line with \{secret\}"):
        load_config(None, ['audit.canary_format="no secret here"'])
    with pytest.raises(ConfigError, match=r"audit\.canary_format: only \{secret\} may appear"):
        load_config(None, ['audit.canary_format="{secret} {other}"'])
    with pytest.raises(ConfigError, match=r"audit\.secret_digits"):
        load_config(None, ["audit.secret_digits=2"])


def _audit_run(tmp_path, name: str):
    from privlm.api import Simulation

    data = tmp_path / "notes.jsonl"
    if not data.exists():
        rows = [{"client_id": f"u{i:03d}", "text": f"note {j}: call Maria Lopez at (723) 923-{i:02d}{j:02d} today."}
                for i in range(40) for j in range(5)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [
        "data.source=jsonl", f'data.path="{data}"', "federation.rounds=10", "federation.clients_per_round=30",
        "privacy.target_epsilon=1.0", "privacy.delta=1e-5", "privacy.seeded_noise=true", "seed=3",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "client.local_steps=2",
        "audit.canaries=20", "audit.update_canaries=200", "audit.secret_digits=6",
        "eval.max_clients=4", "eval.every=100",
    ])
    return Simulation(cfg).run(tmp_path / name, progress=False)


AUDIT = ["--references", "200", "--generations", "3", "--guesses", "40", "--seed", "0"]


def test_audit_passes_an_honest_run_and_catches_noise_100x_too_small(tmp_path, monkeypatch):
    """The claim is epsilon = 1; the broken mechanism adds 1% of the noise it accounts for."""
    honest = _audit_run(tmp_path, "honest")
    r = CliRunner().invoke(app, ["audit", str(honest.run_dir), *AUDIT])
    assert r.exit_code == 0, r.output
    ok = json.loads((honest.run_dir / "audit.json").read_text())
    assert not ok["broken"] and ok["epsilon_lower_bound"] <= 1.0
    assert ok["membership"]["members"] == 36 and ok["membership"]["nonmembers"] == 4
    assert ok["pii"]["generations"] == 3

    import privlm.mechanisms.gaussian as gaussian

    real = gaussian.dp_mean
    monkeypatch.setattr(gaussian, "dp_mean", lambda s, z, n, g: real(s, z / 100, n, g))
    broken = _audit_run(tmp_path, "broken")
    assert broken.epsilon == pytest.approx(honest.epsilon)  # the ledger claims the same
    r = CliRunner().invoke(app, ["audit", str(broken.run_dir), *AUDIT])
    assert r.exit_code == 1, r.output
    assert "AUDIT FAILED" in r.output
    res = json.loads((broken.run_dir / "audit.json").read_text())
    u = res["update_canaries"]["one_run"]
    assert res["broken"] and u["epsilon_lower_bound"] > res["claimed_epsilon"] and u["correct"] == u["guesses"]
    assert "Privacy audit" in (broken.run_dir / "report.html").read_text()
    planted = broken.run_dir / "audit" / "canaries.json"
    assert len(json.loads(planted.read_text())["update_included"]) == 200 and planted.stat().st_mode & 0o077 == 0


def test_resume_refuses_other_canaries_than_the_run_trained_with(tmp_path):
    from privlm.api import Simulation, resume

    cfg = load_config(None, ["data.num_clients=20", "federation.rounds=2", "federation.clients_per_round=5",
                             "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "client.local_steps=1",
                             "audit.canaries=4", "audit.update_canaries=4", "eval.max_clients=2",
                             "data.scrub.enabled=false", "privacy.noise_multiplier=1.0"])  # (no calibration: 23 s)
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="audit canaries differ from the ones this run trained with"):
        Simulation(cfg).run(res.run_dir, progress=False, resume=True)  # a freshly drawn plan
    assert resume(res.run_dir, progress=False).rounds_completed == 2  # the saved plan


def test_update_canaries_need_user_level_dp():
    from privlm.api import Simulation

    cfg = load_config(None, ["data.num_clients=20", "privacy.mode=none", "audit.update_canaries=5"])
    with pytest.raises(ConfigError, match="audit.update_canaries: white-box canaries audit user-level DP"):
        Simulation(cfg)
