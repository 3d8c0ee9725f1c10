"""report.html (issue #25.1): readable numbers, the budget gauge, per-round metrics as a table,
and sample generations from the final checkpoint from public prompts."""

from __future__ import annotations

import re

import pytest

from privlm.api import Simulation
from privlm.config import load_config
from privlm.errors import ConfigError
from privlm.report.html import fmt

TINY = ["data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=false",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
        "federation.rounds=3", "federation.clients_per_round=6", "client.local_steps=1",
        "client.batch_size=4", "eval.max_clients=4", "report.max_new_tokens=12"]


def test_numbers_are_formatted_for_people():
    assert fmt(8.533614012892962e-05) == "8.53 \u00d7 10\u207b\u2075"
    assert fmt(3.141592653589793) == "3.142"
    assert fmt(1227) == "1,227" and fmt(None) == "\u2014" and fmt(True) == "yes"
    assert fmt(0.0) == "0" and fmt(2.5e7) == "2.5 \u00d7 10\u2077"


def test_the_report_has_a_summary_a_gauge_a_metrics_table_and_samples(tmp_path):
    cfg = load_config(None, [*TINY, "privacy.noise_multiplier=1.0", "privacy.max_epsilon=40",
                             'report.prompts=["ROMEO:", "The weather"]'])
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    page = (res.run_dir / "report.html").read_text()
    text = re.sub(r"data:image/png;base64,[^\"]+", "", page)
    summary = text[:text.index("<h2>Guarantee</h2>")]
    assert "<th>rounds completed</th><td>3</td>" in summary and "user-level DP-FedAvg" in summary
    assert f"<th>epsilon, delta</th><td>{fmt(res.epsilon)}, {fmt(res.delta)}</td>" in summary
    assert not re.search(r"\d\.\d{7,}", text), "a number printed with all its digits"
    assert "stopped" not in summary and "None" not in text
    assert 'class="gauge"' in text and f"epsilon {fmt(res.epsilon)} of 40 spent" in text
    assert text.count("<tr>") >= 3 + 1 and "<pre>" not in text  # the metrics are a table, not a dump
    rows = re.findall(r'<table class="metrics">(.*?)</table>', text, re.S)[0].count("<tr>")
    assert rows == 1 + 3  # header + one per round
    samples = re.findall(r"<li><b>(.*?)</b>", text)
    assert samples == ["ROMEO:", "The weather"] and "Samples from the round-3 checkpoint" in text
    assert page.count("data:image/png;base64,") == 3  # learning curves, clients, epsilon


def test_no_prompts_no_samples_and_bad_prompts_are_config_errors(tmp_path):
    cfg = load_config(None, [*TINY, "privacy.mode=none", "report.prompts=[]"])
    res = Simulation(cfg).run(tmp_path / "run", progress=False)
    text = (res.run_dir / "report.html").read_text()
    assert "Samples" not in text and "gauge" not in text.split("</style>")[1]
    with pytest.raises(ConfigError, match="report.prompts"):
        load_config(None, [*TINY, 'report.prompts=[""]'])
