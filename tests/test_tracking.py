"""Experiment tracking (issue #25.3), against the real TensorBoard and MLflow (the tracking extra):
per-round metrics, epsilon and the final guarantee; a resumed run continues the same MLflow run."""

from __future__ import annotations

import json

import pytest

from privlm.api import Simulation, resume
from privlm.config import load_config
from privlm.errors import ConfigError

TINY = ["data.source=synthetic-clinic", "data.num_clients=24", "data.scrub.enabled=false",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
        "federation.rounds=4", "federation.clients_per_round=6", "client.local_steps=1",
        "client.batch_size=4", "eval.max_clients=4", "report.prompts=[]", "privacy.noise_multiplier=1.0",
        "output.checkpoint_every=2"]


def test_tensorboard_gets_every_round_and_the_guarantee(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = Simulation(load_config(None, [*TINY, "tracking.tensorboard=true"])).run(tmp_path / "run", progress=False)
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([m["train_loss"] for m in res.metrics], rel=1e-6)
    eps = acc.Scalars("privacy/epsilon")  # where the ledger gives it: at checkpoints
    assert [e.step for e in eps] == [2, 4] and eps[-1].value == pytest.approx(res.epsilon, rel=1e-6)
    assert "privacy/guarantee/text_summary" in acc.Tags()["tensors"]
    privacy = json.loads((res.run_dir / "privacy.json").read_text())
    assert any(x.startswith("tensorboard/") for x in privacy["not_covered"])
    assert "tensorboard/" in privacy["guarantee"]


def test_mlflow_gets_metrics_params_the_guarantee_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # (MLflow's defaults write under the working directory: ./mlruns)

    cfg = load_config(None, [*TINY, "tracking.mlflow=true"])
    Simulation(cfg).run(tmp_path / "run", progress=False, stop_when=lambda row: row["round"] == 2)
    res = resume(tmp_path / "run", progress=False)
    assert res.rounds_completed == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("privlm")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resume continues the same MLflow run"
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    eps = client.get_metric_history(run.info.run_id, "privacy_epsilon")
    assert max(eps, key=lambda m: m.step).value == pytest.approx(res.epsilon, rel=1e-9)
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    tags, params = run.data.tags, run.data.params
    assert float(tags["privlm.epsilon"]) == privacy["epsilon"] and float(tags["privlm.delta"]) == privacy["delta"]
    assert tags["privlm.guarantee"] == privacy["guarantee"] and tags["privlm.mechanism"] == "user-level DP-FedAvg"
    assert params["privacy.noise_multiplier"] == "1.0" and params["federation.rounds"] == "4"
    assert run.info.status == "FINISHED"
    assert any("mlflow.db" in x for x in privacy["not_covered"])
    assert not (tmp_path / "mlruns").exists()  # nothing outside the run directory


def test_tracking_is_off_by_default_and_a_bad_store_is_one_config_error(tmp_path, monkeypatch):
    res = Simulation(load_config(None, [*TINY, "federation.rounds=1"])).run(tmp_path / "plain", progress=False)
    assert not (res.run_dir / "tensorboard").exists() and not (res.run_dir / "mlflow.db").exists()
    assert not any("tensorboard" in x or "MLflow" in x
                   for x in json.loads((res.run_dir / "privacy.json").read_text())["not_covered"])
    pytest.importorskip("mlflow")
    bad = load_config(None, [*TINY, "tracking.mlflow=true", 'tracking.mlflow_tracking_uri="nosuchscheme://x"'])
    with pytest.raises(ConfigError, match="tracking.mlflow_tracking_uri"):
        Simulation(bad).run(tmp_path / "bad", progress=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="tracking.tensorboard: needs the tensorboard package"):
        Simulation(load_config(None, [*TINY, "tracking.tensorboard=true"])).run(tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def test_a_tracking_uri_s_credentials_never_reach_privacy_json():
    from privlm.tracking import not_covered, redact

    assert redact("https://bob:s3cret@mlflow.example:5000/api?token=abc") == "https://mlflow.example:5000/api"
    assert redact("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"
    cfg = load_config(None, [*TINY, "tracking.mlflow=true",
                             'tracking.mlflow_tracking_uri="https://bob:s3cret@mlflow.example/?token=abc"'])
    (entry,) = not_covered(cfg)
    assert "mlflow.example" in entry and "s3cret" not in entry and "token" not in entry
