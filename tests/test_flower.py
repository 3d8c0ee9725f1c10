"""The Flower runtime's adapter, in process: the privlm ServerApp and ClientApp talking through a
grid that hands messages straight to the ClientApp (no sockets). Real processes are tested in
test_flower_deploy.py."""

import json
import math
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from privlm.config import load_config
from privlm.errors import ConfigError, DataError, FederationError
from privlm.runtime.flower import codec
from privlm.runtime.flower.client_app import app as client_app
from privlm.runtime.flower.server_app import flower_engine
from privlm.privacy.accountant import epsilon_for, round_event
from privlm.api import Simulation

TINY = [
    "data.source=tinyshakespeare",
    "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=32",
    "client.batch_size=8", "client.optimizer=adam", "client.lr=0.01", "client.local_steps=3",
    "federation.rounds=3", "federation.clients_per_round=2", "data.silos=4",
    "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.5", "privacy.seeded_noise=true",
    "output.checkpoint_every=1", "eval.every=1", "seed=5",
]


def _cfg(shared_data, *extra):
    return load_config(None, [*TINY, f'data.path="{shared_data / "tinyshakespeare.txt"}"', *extra])


class LoopbackGrid(Grid):
    """Delivers each message to the privlm ClientApp of its node, in this process.

    ``behaviour[node]`` may replace a node's reply: "silent" (never answers), "error"
    (an error reply) or a function ``(message, reply) -> reply`` (a tampering node).
    """

    def __init__(self, num_nodes: int, silos: int, behaviour=None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
        self.contexts = {
            1000 + p: Context(run_id=1, node_id=1000 + p, node_config={"partition-id": p, "num-partitions": silos},
                              state=RecordDict(), run_config={})
            for p in range(num_nodes)
        }
        self.behaviour = behaviour or {}
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, str]] = []

    def set_run(self, run):  # pragma: no cover - not used
        self._run = run

    @property
    def run(self):  # pragma: no cover - not used
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type))
            how = self.behaviour.get(node)
            ids.append(mid)
            if how == "silent" and msg.metadata.message_type == "train":
                continue
            if how == "error" and msg.metadata.message_type == "train":
                self.replies[mid] = Message(Error(code=0, reason="node crashed"), reply_to=msg)
                continue
            try:
                reply = client_app(message=msg, context=self.contexts[node])
            except Exception as e:  # what flwr-clientapp does with a raising ClientApp
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if callable(how) and msg.metadata.message_type == "train":
                reply = how(msg, reply)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - privlm streams instead
        raise AssertionError("privlm must stream replies (push/pull), not wait for all of them")


def _final_params(run_dir, rounds):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"round-{rounds:04d}.safetensors")


def _npy_with_pickle(obj) -> bytes:
    """A .npy file whose payload is a pickle (what a malicious node could send)."""
    import io

    buf = io.BytesIO()
    arr = np.empty(1, dtype=object)
    arr[0] = obj
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_codec_round_trips_tensors_and_refuses_pickles():
    t = {"b": torch.randn(3, 2), "a": torch.arange(5, dtype=torch.int64), "h": torch.randn(4).to(torch.bfloat16)}
    back = codec.from_record(codec.to_record(t), t)
    assert list(codec.to_record(t)) == ["a", "b", "h"]
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=_npy_with_pickle([1]))
    assert "not a NumPy array" in codec.from_record(ArrayRecord({"w": pickled}))
    obj = np.array([object()], dtype=object)
    with pytest.raises((TypeError, ValueError)):  # Flower itself refuses to serialise an object array
        Array.from_numpy_ndarray(obj)
    assert "not an ArrayRecord" in codec.from_record(ConfigRecord({"x": 1}))
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"not numpy at all")
    assert "not a NumPy array" in codec.from_record(ArrayRecord({"w": garbage}))


@pytest.mark.slow
def test_flower_server_equals_the_in_process_run(shared_data, tmp_path):
    """Same seed, seeded noise: same clients per round, same epsilon, same parameters."""
    cfg = _cfg(shared_data)
    ref = Simulation(cfg).run(tmp_path / "sim", progress=False)
    grid = LoopbackGrid(4, 4)
    res = flower_engine(cfg, grid, 4).run(tmp_path / "flower", progress=False)
    assert res.rounds_completed == ref.rounds_completed == 3
    sim_rows, fl_rows = ref.metrics, res.metrics
    for a, b in zip(sim_rows, fl_rows):
        assert a["sampled"] == b["sampled"] and a["clients"] == b["clients"], (a, b)
        assert a["epsilon"] == b["epsilon"]
        assert b["dropped"] == 0 and b["rejected"] == 0
        assert math.isclose(a["eval_loss"], b["eval_loss"], rel_tol=1e-5)
    trained = [n for n, kind in grid.sent if kind == "train"]
    assert len(trained) == sum(r["sampled"] for r in fl_rows) > 0
    p_sim, p_fl = _final_params(tmp_path / "sim", 3), _final_params(tmp_path / "flower", 3)
    for k in p_sim:
        assert torch.allclose(p_sim[k], p_fl[k], atol=1e-6), k
    sim_priv = json.loads((tmp_path / "sim" / "privacy.json").read_text())
    fl_priv = json.loads((tmp_path / "flower" / "privacy.json").read_text())
    assert sim_priv["ledger"] == fl_priv["ledger"] and sim_priv["epsilon"] == fl_priv["epsilon"]
    assert "4 Flower nodes registered" in fl_priv["population"]


def _tamper(kind):
    def tamper(msg, reply):
        content = RecordDict()
        upd = reply.content.array_records[codec.UPDATE]
        if kind == "nan":
            arrays = {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in upd.items()}
            content[codec.UPDATE] = ArrayRecord(arrays)
        elif kind == "shape":
            arrays = {k: Array(np.zeros((3,), dtype=np.float32)) for k in upd}
            content[codec.UPDATE] = ArrayRecord(arrays)
        elif kind == "missing":
            pass  # no update at all
        elif kind == "pickle":
            content[codec.UPDATE] = ArrayRecord({k: Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                                          data=_npy_with_pickle(v)) for k, v in upd.items()})
        content[codec.METRICS] = MetricRecord({"num_tokens": 10})
        return Message(content, reply_to=msg)
    return tamper


@pytest.mark.slow
def test_garbage_and_silent_nodes_contribute_nothing_and_change_no_epsilon(shared_data, tmp_path, caplog):
    """Four tampering nodes, one that never answers and one that crashes, all sampled every round."""
    kinds = {1001: _tamper("nan"), 1002: _tamper("shape"), 1003: _tamper("missing"), 1004: _tamper("pickle"),
             1005: "silent", 1006: "error"}
    cfg = _cfg(shared_data, "data.silos=7", "federation.clients_per_round=7", "federation.rounds=2",
               "flower.round_timeout=5")  # the silent node costs 5 s a round; answering ones need far less, even loaded
    res = flower_engine(cfg, LoopbackGrid(7, 7, kinds), 7).run(tmp_path / "run", progress=False)
    assert res.rounds_completed == 2
    one_round = round_event(1.0, 0.7)
    for r, row in enumerate(res.metrics, start=1):
        assert row["clients"] == 1 and row["rejected"] == 4 and row["dropped"] == 2, row
        assert row["epsilon"] == pytest.approx(epsilon_for([one_round] * r, res.delta, "pld"), rel=1e-12)
        assert math.isfinite(row["eval_loss"])
    assert all(torch.isfinite(v).all() for v in _final_params(tmp_path / "run", 2).values())
    for cid in ("silo-1", "silo-2", "silo-3", "silo-4"):
        assert f"rejected update from client {cid}" in caplog.text
    assert "silo-5) did not answer" in caplog.text and "silo-6) failed: node crashed" in caplog.text


def test_flower_server_refuses_what_it_cannot_run(shared_data):
    with pytest.raises(ConfigError, match="privacy.mode"):
        flower_engine(_cfg(shared_data, "privacy.mode=example"), LoopbackGrid(2, 2), 2)
    with pytest.raises(ConfigError, match="audit"):
        flower_engine(_cfg(shared_data, "audit.update_canaries=3"), LoopbackGrid(2, 2), 2)
    with pytest.raises(FederationError, match="only 2 of 3 nodes"):
        flower_engine(_cfg(shared_data, "flower.node_wait=0.3"), LoopbackGrid(2, 2), 3)
    with pytest.raises(DataError, match="did not load its data"):  # 5 silos of a 2-way split
        flower_engine(_cfg(shared_data, "flower.node_wait=0.3"), LoopbackGrid(2, 99999), 2)


def test_cli_makes_certificates_node_keys_and_the_app(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from typer.testing import CliRunner

    from privlm.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["certs", str(tmp_path / "c"), "--host", "10.1.2.3", "--host", "fl.example"]).exit_code == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example"]
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o777 == 0o600
    assert runner.invoke(app, ["certs", str(tmp_path / "c")]).exit_code == 2  # never overwrites

    assert runner.invoke(app, ["node-key", str(tmp_path / "k" / "node")]).exit_code == 0
    private = load_ssh_private_key((tmp_path / "k" / "node").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "k" / "node.pub").read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (tmp_path / "k" / "node").stat().st_mode & 0o777 == 0o600
    res = runner.invoke(app, ["node-key", str(tmp_path / "k" / "node")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output

    assert runner.invoke(app, ["flower-app", str(tmp_path / "app")]).exit_code == 0
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "privlm.runtime.flower.server_app:app"' in text
    assert runner.invoke(app, ["flower-app", str(tmp_path / "app")]).exit_code == 2


def test_the_population_is_the_nodes_actually_used(shared_data):
    """Issue #26.6: 4 nodes registered where 3 were expected; all 4 are the population and
    the guarantee says 4 (it said "the 3 Flower nodes" with N = 4)."""
    server = flower_engine(_cfg(shared_data, "data.silos=4"), LoopbackGrid(4, 4), 3)
    assert server.algo.num_clients == 4 and len(server.executor.node_ids) == 4
    assert "the 4 Flower nodes" in server.population.description
    assert "the 4 Flower nodes" in server.privacy_record(0)["guarantee"]


class _BoastfulGrid(LoopbackGrid):
    """Node 1000 answers evaluation with more correct tokens than it scored."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for mid, msg in zip(ids, messages):
            if msg.metadata.dst_node_id == 1000 and msg.metadata.message_type == "evaluate":
                self.replies[mid] = Message(RecordDict({codec.METRICS: MetricRecord(
                    {"loss_sum": 1.0, "correct": 108_049_702.0, "count": 10.0})}), reply_to=msg)
        return ids


def test_a_node_reporting_an_impossible_evaluation_is_left_out(shared_data):
    """Issue #26.6: a node reported an eval accuracy of 108,049,702."""
    honest = flower_engine(_cfg(shared_data, "data.silos=2"), LoopbackGrid(2, 2), 2)
    boastful = flower_engine(_cfg(shared_data, "data.silos=2"), _BoastfulGrid(2, 2), 2)
    from privlm.federated.client import get_params

    params = get_params(honest.model)
    loss, acc = boastful.executor.evaluate(params)
    assert 0 <= acc <= 1 and math.isfinite(loss)
    assert (loss, acc) != honest.executor.evaluate(params)  # node 1000 was left out, node 1001 counted
