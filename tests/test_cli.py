"""The command line: epsilon/calibrate equal the library, errors are one line with exit 2,
and run -> eval -> generate works on a run directory."""

import ast
import inspect
import json
import sys

import pytest
from typer.testing import CliRunner

from privlm.cli import app
from privlm.privacy import calibrate_noise_multiplier, epsilon

runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("acc", ["pld", "rdp"])
def test_epsilon_command_equals_library(acc):
    out = _ok(["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "1.1", "--rounds", "200",
               "--delta", "1e-6", "--accountant", acc])
    assert float(out) == pytest.approx(epsilon(0.01, 1.1, 200, 1e-6, acc), rel=1e-5)


def test_calibrate_command():
    out = _ok(["calibrate", "--target-epsilon", "2", "--sampling-rate", "0.02", "--rounds", "100",
               "--delta", "1e-5"])
    z = float(out)
    assert z == pytest.approx(calibrate_noise_multiplier(2.0, 0.02, 100, 1e-5), rel=1e-5)
    assert epsilon(0.02, z, 100, 1e-5) <= 2.0


@pytest.mark.parametrize("args,needle", [
    (["epsilon", "--sampling-rate", "1.5", "--noise-multiplier", "1", "--rounds", "1", "--delta", "1e-5"],
     "--sampling-rate"),
    (["epsilon", "--noise-multiplier", "1", "--rounds", "1", "--delta", "1e-5"], "--sampling-rate is required"),
    (["run", "--set", "privacy.clip_norm=-3"], "privacy.clip_norm"),
    (["run", "--set", "federation.roundz=3"], "federation.roundz: unknown key"),
    (["run", "nonexistent.toml"], "nonexistent.toml: config file not found"),
    (["eval", "/nonexistent/run"], "not a privlm run directory"),
    (["run", "--set", "data.source=dir", "--set", "data.path=/nonexistent/x"], "/nonexistent/x"),
    (["run", "--set", "data.num_clients=200", "--set", "federation.clients_per_round=50",
      "--set", "privacy.noise_multiplier=0.3", "--set", "privacy.max_epsilon=0.5"],
     "privacy.max_epsilon: budget 0.5 is below the cost of a single round"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_run_eval_generate(shared_data, tmp_path):
    out = tmp_path / "run"
    text = _ok(["run", "--no-progress", "--out", str(out),
                "--set", "data.source=tinyshakespeare",
                "--set", f'data.path="{shared_data / "tinyshakespeare.txt"}"',
                "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
                "--set", "model.block_size=32", "--set", "federation.rounds=2",
                "--set", "federation.clients_per_round=10", "--set", "client.local_steps=2",
                "--set", "eval.max_clients=20",
                "--set", "privacy.noise_multiplier=1.0"])  # (calibration is tested in test_calibrate_command)
    assert "run directory" in text and "epsilon=" in text
    priv = json.loads((out / "privacy.json").read_text())
    again = _ok(["epsilon", "--ledger", str(out / "privacy.json")])
    assert float(again) == pytest.approx(priv["epsilon"], rel=1e-5)
    ev = _ok(["eval", str(out)])
    assert "round 2" in ev and "accuracy" in ev
    gen = _ok(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"])
    assert gen.startswith("ROMEO:") and len(gen.strip()) > len("ROMEO:")


def test_data_download_command_checks_sums(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVLM_DATA_MIRROR", shared_data.as_uri())
    out = _ok(["data", "download", "tinyshakespeare", "--to", str(tmp_path / "ts")])
    assert "verified" in out
    files = list((tmp_path / "ts").rglob("*.txt"))
    assert len(files) == 1 and files[0].stat().st_size == 1_115_394
    res = runner.invoke(app, ["data", "download", "sonnets"])
    assert res.exit_code == 2 and "sonnets" in res.output


def _federation_failure(*args, **kwargs):
    from privlm.errors import FederationError

    raise FederationError("node 3: the SuperNode process exited with code 1 (runs/x/privacy.json keeps "
                          "every round that started)")


def test_a_federation_error_is_one_line_exit_2(monkeypatch):
    import privlm.inference

    monkeypatch.setattr(privlm.inference, "evaluate_run", _federation_failure)
    res = runner.invoke(app, ["eval", "somewhere"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: node 3: the SuperNode process exited"), res.stderr
    assert res.stdout == ""


def test_a_federation_error_through_the_privlm_command(monkeypatch, capsys):
    """The console script (entry) reports it the same way: one line on stderr, exit code 2."""
    import privlm.inference
    from privlm import cli

    monkeypatch.setattr(privlm.inference, "evaluate_run", _federation_failure)
    monkeypatch.setattr(sys, "argv", ["privlm", "eval", "somewhere"])
    with pytest.raises(SystemExit) as exit_:
        cli.entry()
    out = capsys.readouterr()
    assert exit_.value.code == 2
    lines = [line for line in (out.err + out.out).splitlines() if line.strip()]
    assert len(lines) == 1 and "node 3: the SuperNode process exited" in out.err, lines
    assert "Traceback" not in out.err


def test_debug_reraises_a_privlm_error_for_its_traceback(monkeypatch):
    import privlm.inference
    from privlm import cli
    from privlm.errors import FederationError

    monkeypatch.setattr(privlm.inference, "evaluate_run", _federation_failure)
    monkeypatch.setitem(cli._state, "debug", False)
    res = runner.invoke(app, ["--debug", "eval", "somewhere"])
    assert isinstance(res.exception, FederationError)


def test_cli_has_one_privlm_error_handler():
    """Issue #19: commands raise; one handler (the click group's) turns a PrivlmError into a line."""
    import privlm.errors
    from privlm import cli

    ours = {name for name, obj in vars(privlm.errors).items()
            if inspect.isclass(obj) and issubclass(obj, privlm.errors.PrivlmError)}
    assert {"PrivlmError", "ConfigError", "DataError", "FederationError"} <= ours

    def names(node):
        if node is None:
            return set()
        parts = node.elts if isinstance(node, ast.Tuple) else [node]
        return {p.id if isinstance(p, ast.Name) else p.attr for p in parts if isinstance(p, (ast.Name, ast.Attribute))}

    tree = ast.parse(inspect.getsource(cli))
    handlers = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and names(h.type) & ours]
    assert len(handlers) <= 1, [h.lineno for h in handlers]
    main_guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert all(n is tree.body[-1] for n in main_guards), "if __name__ == '__main__' belongs at the end"


def test_quick_commands_and_early_errors_never_import_torch(tmp_path):
    """epsilon, a ledger's epsilon and a bad config or --out answer without loading torch (~2 s)."""
    import subprocess

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine\n")
    from privlm.privacy import Ledger, round_event

    led = Ledger()
    led.append(1, round_event(0.1, 1.0))
    (tmp_path / "priv.json").write_text(json.dumps({"mode": "user", "delta": 1e-5, "ledger": led.to_list()}))
    code = (
        "import sys\nfrom privlm.cli import app\n"
        "for argv in ([\"epsilon\", \"--sampling-rate\", \"0.01\", \"--noise-multiplier\", \"1\", \"--rounds\", \"3\", "
        "\"--delta\", \"1e-5\"], [\"epsilon\", \"--ledger\", \"priv.json\"], "
        "[\"run\", \"--set\", \"privacy.noise_multiplier=1e308\"], [\"run\", \"--out\", \"taken\"]):\n"
        "    try:\n        app(argv)\n    except SystemExit as e:\n        print(argv[0], e.code)\n"
        "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()  # two epsilons, each followed by its exit code
    assert float(lines[0]) > 0 and float(lines[2]) > float(lines[0]), (proc.stdout, proc.stderr[-2000:])
    assert lines[1::2] == ["epsilon 0", "epsilon 0", "run 2"] and lines[-2:] == ["run 2", "False"], \
        (proc.stdout, proc.stderr[-2000:])
    assert "not empty" in proc.stderr and "privacy.noise_multiplier" in proc.stderr
