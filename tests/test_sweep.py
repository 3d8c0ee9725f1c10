"""privlm sweep: a grid of runs, the table and the accuracy-vs-epsilon plot."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privlm.cli import app
from privlm.errors import ConfigError
from privlm.report.html import fmt
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


def test_the_sweep_report_compares_the_runs_with_their_setting_and_the_baseline(tmp_path):
    """sweep.html from rows as sweep() writes them (here over two tiny real runs)."""
    import re

    from privlm.api import Simulation
    from privlm.config import load_config
    from privlm.sweep import write_outputs

    tiny = ["data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=false", "model.n_layer=1",
            "model.n_embd=16", "model.n_head=2", "model.block_size=32", "federation.rounds=1",
            "federation.clients_per_round=6", "client.local_steps=1", "eval.max_clients=4", "report.prompts=[]"]
    out = tmp_path / "sw"
    rows = []
    for point, extra in (({"privacy.target_epsilon": "4"}, ["privacy.target_epsilon=4"]),
                         ({"privacy.target_epsilon": "inf"}, ["privacy.mode=none"])):
        res = Simulation(load_config(None, [*tiny, *extra])).run(out / point["privacy.target_epsilon"], progress=False)
        rows.append({"point": point, "run_dir": str(res.run_dir), "epsilon": res.epsilon, "delta": res.delta,
                     "eval_accuracy": res.eval_accuracy, "eval_loss": res.eval_loss, "rounds": 1, "stopped": None})
    write_outputs(rows, [("privacy.target_epsilon", ["4", "inf"])], out)
    page = (out / "sweep.html").read_text()
    cells = [re.findall(r"<td>(.*?)</td>", tr) for tr in re.findall(r"<tr><td>.*?</tr>", page)]
    assert len(cells) == 2
    private, baseline = cells
    assert private[:2] == ["4", fmt(rows[0]["epsilon"])] and baseline[1] == "non-private"
    assert private[6:9] == ["24", "6", "GPT 1 x 16"] and '<a href="4/report.html">' in private[9]
    assert f"Non-private baseline at the same compute: held-out accuracy {fmt(rows[1]['eval_accuracy'])}" in page
    assert page.count("data:image/png;base64,") == 1 and "None" not in page
