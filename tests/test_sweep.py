"""privlm sweep: a grid of runs, the table and the accuracy-vs-epsilon plot."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privlm.cli import app
from privlm.errors import ConfigError
from privlm.sweep import parse_grid, points


def test_grid_points_run_the_non_private_point_once():
    grid = parse_grid(["privacy.target_epsilon=1,inf", "privacy.adaptive_clipping=false,true"])
    got = points(grid)
    assert got == [
        {"privacy.target_epsilon": "1", "privacy.adaptive_clipping": "false"},
        {"privacy.target_epsilon": "1", "privacy.adaptive_clipping": "true"},
        {"privacy.target_epsilon": "inf"},
    ]
    with pytest.raises(ConfigError, match="KEY=V1"):
        parse_grid(["privacy.target_epsilon"])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["a.b=1", "a.b=2"])


@pytest.mark.slow
def test_sweep_writes_runs_table_and_plot(shared_data, tmp_path):
    sets = ["data.source=tinyshakespeare", f'data.path="{shared_data / "tinyshakespeare.txt"}"',
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
            "client.local_steps=2", "federation.rounds=2", "federation.clients_per_round=30",
            "eval.max_clients=10", "privacy.seeded_noise=true"]
    args = ["sweep", "--out", str(tmp_path / "sw"), "--no-progress",
            "--set-grid", "privacy.target_epsilon=4,inf", "--set-grid", "privacy.adaptive_clipping=false,true"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(rows) == 3
    fixed, adaptive, nonprivate = rows
    assert fixed["epsilon"] == adaptive["epsilon"] and 0 < fixed["epsilon"] <= 4
    assert nonprivate["epsilon"] is None and nonprivate["point"] == {"privacy.target_epsilon": "inf"}
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "non-private" in table and table.count("\n") == 5
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    for r in rows:
        assert Path(r["run_dir"]).resolve().parent == (tmp_path / "sw").resolve()
