"""Experiment tracking (``[tracking]``): TensorBoard and MLflow, for users who keep their runs there.

Each completed round's metrics (those of ``metrics.jsonl``) are logged with the round as the step,
after the round is durable in the run directory, so a round lost to a crash and run again is logged
once. Epsilon is logged where the ledger gives it (at checkpoints); at the end the guarantee is
logged as MLflow tags (``privlm.epsilon``, ``privlm.delta``, ``privlm.guarantee``, ...) and the
run's config as MLflow params; TensorBoard gets the guarantee as text. A resumed run appends to
the same MLflow run (its id is kept in ``RUN_DIR/tracking.json``).

The metrics are computed from clients' data without noise: privacy.json lists the tracking stores
under what the guarantee does not cover. By default both stores are in the run directory
(``tensorboard/``, ``mlflow.db``). A tracker that fails during the run is switched off with one
warning; the run itself goes on (its run directory is the record).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from privlm.errors import ConfigError

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
_ROW_KEYS = {"train_loss": "train/loss", "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy",
             "epsilon": "privacy/epsilon", "clients": "clients/summed", "sampled": "clients/sampled",
             "rejected": "clients/rejected", "dropped": "clients/dropped", "clipped": "clients/clipped",
             "clip_norm": "privacy/clip_norm", "seconds": "time/round_seconds"}


def not_covered(cfg) -> list[str]:
    """privacy.json's not-covered entries for the configured tracking stores."""
    t = cfg.tracking
    out = []
    if t.tensorboard:
        out.append("tensorboard/ (TensorBoard event files: the per-round metrics)")
    if t.mlflow:
        where = "mlflow.db" if not t.mlflow_tracking_uri else f"the MLflow store {redact(t.mlflow_tracking_uri)}"
        out.append(f"{where} (MLflow: the per-round metrics)")
    return out


def redact(uri: str) -> str:
    """A tracking URI without what may be a secret: user:password@ and the query (?token=...)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<an MLflow URI>"
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_available(cfg) -> None:
    """A one-line ConfigError, before the run directory is touched, if a configured tracker's package is missing."""
    import importlib.util

    t = cfg.tracking
    for on, module, key, package in ((t.tensorboard, "tensorboard", "tracking.tensorboard", "tensorboard"),
                                     (t.mlflow, "mlflow", "tracking.mlflow", "mlflow-skinny")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f'{key}: needs the {package} package (pip install "privlm[tracking]")')


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = str(v)[:6000]  # (MLflow's limit on a param value)
    return out


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, run_dir: Path, cfg, resume: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError('tracking.tensorboard: needs the tensorboard package (pip install "privlm[tracking]")'
                              ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not resume:
            self.writer.add_text("config", "```toml\n" + cfg.to_toml() + "\n```", 0)

    def log_round(self, row: dict) -> None:
        for key, tag in _ROW_KEYS.items():
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
                self.writer.add_scalar(tag, row[key], row["round"])
        self.writer.flush()

    def finish(self, privacy: dict) -> None:
        rounds = privacy.get("rounds_completed") or 0
        self.writer.add_text("privacy/guarantee", privacy.get("guarantee", ""), rounds)
        self.writer.close()


class _MLflow:
    name = "MLflow"

    def __init__(self, run_dir: Path, cfg, resume: bool) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError('tracking.mlflow: needs the mlflow-skinny package (pip install "privlm[tracking]")'
                              ) from None
        t = cfg.tracking
        uri = t.mlflow_tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        store = redact(t.mlflow_tracking_uri) if t.mlflow_tracking_uri else "the run directory's mlflow.db"
        if t.mlflow_tracking_uri:
            log.warning("tracking.mlflow_tracking_uri = %s: the per-round metrics (not covered by the guarantee) "
                        "are written there, outside the run directory", store)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            saved = _read_tracking(run_dir)
            run_id = saved.get("mlflow_run_id") if resume and saved.get("mlflow_store") == store else None
            if run_id is not None:
                try:
                    self.client.update_run(run_id, status="RUNNING")
                except Exception as e:  # (deleted or purged since): a new MLflow run, not a failed resume
                    log.warning("tracking: MLflow run %s cannot be continued (%s); starting a new one", run_id,
                                type(e).__name__)
                    run_id = None
            if run_id is None:
                run_id = self._new_run(run_dir, cfg)
                _write_tracking(run_dir, {"mlflow_store": store, "mlflow_run_id": run_id})
        except Exception as e:  # mlflow raises many kinds; all mean "no such store"
            first = (str(e).splitlines() or [""])[0][:200]
            key = "tracking.mlflow_tracking_uri" if t.mlflow_tracking_uri else "tracking.mlflow"
            raise ConfigError(f"{key}: cannot use the MLflow store {store}: {type(e).__name__}: {first}") from None
        self.run_id = run_id

    def _new_run(self, run_dir: Path, cfg) -> str:
        from mlflow.entities import Param

        name = cfg.tracking.mlflow_experiment
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            name, artifact_location=(run_dir / "mlflow-artifacts").resolve().as_uri())
        run_id = self.client.create_run(exp_id, run_name=run_dir.name,
                                        tags={"privlm.run_dir": str(run_dir.resolve())}).info.run_id
        items = [Param(k, v) for k, v in _flat(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(items), 100):  # (MLflow takes 100 params a batch)
            self.client.log_batch(run_id, params=items[i:i + 100])
        return run_id

    def log_round(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag.replace("/", "_"), float(row[key]), now, row["round"]) for key, tag in _ROW_KEYS.items()
                   if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, privacy: dict) -> None:
        from privlm.report.html import mechanism_label

        tags = {"privlm.mechanism": mechanism_label(privacy), "privlm.mode": str(privacy.get("mode")),
                "privlm.rounds_completed": str(privacy.get("rounds_completed")),
                "privlm.guarantee": str(privacy.get("guarantee", ""))[:8000]}
        for key in ("epsilon", "delta", "unit", "accountant", "noise_multiplier", "clip_norm", "sampling_rate",
                    "num_clients", "stopped"):
            if privacy.get(key) is not None:
                tags[f"privlm.{key}"] = repr(privacy[key]) if isinstance(privacy[key], float) else str(privacy[key])
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status="FINISHED")


def _read_tracking(run_dir: Path) -> dict:
    path = run_dir / TRACKING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # (a new MLflow run then: nothing is lost but the link to the old one)
    return data if isinstance(data, dict) else {}


def _write_tracking(run_dir: Path, data: dict) -> None:
    from privlm.rundir import atomic_write

    atomic_write(run_dir / TRACKING_FILE, (json.dumps(data, indent=2) + "\n").encode())


class Trackers:
    """The configured trackers; each failure switches its tracker off with one warning."""

    def __init__(self, trackers: list) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, cfg, run_dir: Path, resume: bool = False) -> Trackers:
        t = cfg.tracking
        trackers: list = []
        if t.tensorboard:
            trackers.append(_TensorBoard(run_dir, cfg, resume))
        if t.mlflow:
            trackers.append(_MLflow(run_dir, cfg, resume))
        return cls(trackers)

    def _each(self, method: str, arg: dict) -> None:
        for tr in list(self.trackers):
            try:
                getattr(tr, method)(arg)
            except Exception as e:  # a tracker never fails the run: the run directory is the record
                log.warning("tracking: %s failed (%s: %s); it is off for the rest of this run",
                            tr.name, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
                self.trackers.remove(tr)

    def log_round(self, row: dict) -> None:
        self._each("log_round", row)

    def finish(self, privacy: dict) -> None:
        self._each("finish", privacy)
