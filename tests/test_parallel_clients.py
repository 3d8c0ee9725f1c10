"""Clients trained concurrently (``workers``): a speed-up that must not change a single result.

The server sees the same updates in the same order as with one client at a time.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

import privlm.runtime.threads as threads_executor
from privlm.federated.client import local_train
from privlm.runtime.training import client_generator
from privlm.config import load_config
from privlm.errors import ConfigError
from privlm.federated import dp_fedavg
from privlm.federated.client import get_params
from privlm.api import Simulation

TINY = ["data.source=synthetic-clinic", "data.num_clients=40", "data.scrub.enabled=false",
        "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "federation.clients_per_round=12", "client.local_steps=2", "eval.max_clients=10",
        "client.optimizer=sgd", "client.lr=0.5", "privacy.noise_multiplier=1.0",
        "privacy.seeded_noise=true", "federation.rounds=3"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``workers > 1`` sets torch's thread count for the process; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_parallel_clients_give_the_sequential_run(tmp_path):
    runs = {}
    for w in (1, 3):
        torch.set_num_threads(1)  # the same kernels both times, so equality can be tight
        cfg = load_config(None, [*TINY, f"workers={w}"])
        runs[w] = Simulation(cfg).run(tmp_path / str(w), progress=False)
    seq, par = runs[1], runs[3]
    for key in ("sampled", "clients", "epsilon", "train_loss", "clipped"):
        assert [m[key] for m in seq.metrics] == [m[key] for m in par.metrics], key
    a = load_file(str(tmp_path / "1" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "3" / "checkpoints" / "round-0003.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_parallel_clients_stream_in_order_with_bounded_work_in_flight(monkeypatch):
    sim = Simulation(load_config(None, [*TINY, "workers=2"]))
    started, running = [], []
    real = threads_executor.local_train

    def counting(model, params, tokens, cfg, gen):
        started.append(model)
        running.append(1)
        try:
            return real(model, params, tokens, cfg, gen)
        finally:
            running.pop()

    monkeypatch.setattr(threads_executor, "local_train", counting)
    ids = list(range(20))
    stream = sim.contributions(dp_fedavg.init(sim.algo, get_params(sim.model)), ids)
    first = next(stream)
    assert first.client_id == sim.corpus.clients[0].client_id
    assert len(started) <= 4  # at most 2 x workers clients trained ahead of the consumer
    rest = list(itertools.islice(stream, 5))
    assert [c.client_id for c in rest] == [sim.corpus.clients[i].client_id for i in range(1, 6)]
    stream.close()  # a consumer that stops early (a crash, a rejected round) leaves no work running
    assert not running
    assert len(started) <= 6 + 4  # nothing was trained beyond the 2 x workers window
    assert len(set(map(id, started))) == 2  # two model replicas, never the server's model
    assert all(m is not sim.model for m in started)


def test_workers_are_refused_for_example_level_silos():
    cfg = load_config(None, ["data.source=synthetic-clinic", "data.num_clients=30", "data.silos=3",
                             "privacy.mode=example", "data.scrub.enabled=false", "workers=2",
                             "federation.clients_per_round=3"])
    with pytest.raises(ConfigError, match=r"^workers: "):
        Simulation(cfg)


def test_parallel_clients_with_dropout_are_not_replayable(caplog):
    """Dropout masks come from torch's one global generator, in thread order: such a seeded
    run is not a function of (state, round), so a resume must pay for its lost rounds again."""
    assert Simulation(load_config(None, [*TINY, "model.dropout=0.1"])).replayable
    assert Simulation(load_config(None, [*TINY, "workers=2"])).replayable
    assert "not bit-reproducible" not in caplog.text
    sim = Simulation(load_config(None, [*TINY, "workers=2", "model.dropout=0.1"]))
    assert not sim.replayable
    assert "not bit-reproducible" in caplog.text


# ----------------------------------------------------------------- worker processes

def _no_worker_processes_left() -> bool:
    import multiprocessing

    return not [p for p in multiprocessing.active_children() if p.name.startswith("privlm-client")]


def _worker_threads() -> int:
    """The torch threads each of 2 worker processes gets (cpus // 2), for a same-kernels reference."""
    from privlm.runtime.training import threads_per_worker

    return threads_per_worker(2)


def test_update_bytes_round_trip_for_mixed_dtypes_and_sizes():
    from privlm.runtime.workers import _from_bytes, _layout, _to_bytes

    tensors = {"a": torch.randn(3, dtype=torch.bfloat16), "b": torch.randn(5, 2), "empty": torch.zeros(0, 4),
               "c": torch.arange(7, dtype=torch.float16), "d": torch.randn(4, 3).t()}  # odd sizes, a transposed one
    back = _from_bytes(bytearray(_to_bytes(list(tensors.values()))), _layout(tensors))
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with pytest.raises(ValueError, match="bytes for a layout"):
        _from_bytes(bytearray(_to_bytes(list(tensors.values()))[:-8]), _layout(tensors))


def test_worker_processes_give_the_sequential_run_even_with_dropout(tmp_path):
    """Each worker process seeds its own generator for each client, as one-at-a-time training
    does, so even dropout gives the same run (threads cannot promise that)."""
    runs = {}
    for name, extra in (("seq", ["workers=1"]), ("proc", ["workers=2", "worker_kind=process"])):
        torch.set_num_threads(_worker_threads())  # the kernels the worker processes run
        sim = Simulation(load_config(None, [*TINY, "model.dropout=0.1", *extra]))
        assert sim.replayable
        runs[name] = sim.run(tmp_path / name, progress=False)
    assert _no_worker_processes_left()  # run() stops its workers
    seq, proc = runs["seq"], runs["proc"]
    for key in ("sampled", "clients", "epsilon", "train_loss", "clipped"):
        assert [m[key] for m in seq.metrics] == [m[key] for m in proc.metrics], key
    a = load_file(str(tmp_path / "seq" / "checkpoints" / "round-0003.safetensors"))
    b = load_file(str(tmp_path / "proc" / "checkpoints" / "round-0003.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_worker_processes_stream_in_order_and_an_early_close_leaves_none_busy(tmp_path):
    torch.set_num_threads(_worker_threads())  # the reference below trains with the workers' kernels
    sim = Simulation(load_config(None, [*TINY, "workers=2", "worker_kind=process"]))
    sim.executor.workdir = tmp_path  # (run() sets it to the run directory)
    try:
        state = dp_fedavg.init(sim.algo, get_params(sim.model))
        stream = sim.contributions(state, list(range(10)))
        first = [next(stream) for _ in range(3)]
        assert [c.client_id for c in first] == [sim.corpus.clients[i].client_id for i in range(3)]
        stream.close()  # a consumer that stops early: the updates in flight are drained
        assert sim.executor._pool is not None and not any(sim.executor._pool._busy)
        # the pool still serves the next stream, and each update is the sequential one to the bit
        again = list(sim.contributions(state, [0, 1, 2]))
        for i, c in enumerate(again):
            cid = sim.corpus.clients[i].client_id
            ref = local_train(sim.model, state.params, sim.train_tokens[i], sim.local,
                                         client_generator(sim.cfg, state.round, cid))
            assert c.client_id == cid and c.weight == float(ref.num_tokens)
            assert all(torch.equal(c.update[k], ref.update[k]) for k in ref.update)
        # a client a worker cannot train: an error naming it, and the pool is never read again
        from privlm.runtime.workers import WorkerError

        pool = sim.executor._pool
        with pytest.raises(WorkerError, match=r"client nobody: training failed in privlm-client-0"):
            list(pool.train(state.params, 0, [("nobody", 10**9)]))
        assert pool.broken
        with pytest.raises(WorkerError, match="stopped after an error"):
            list(pool.train(state.params, 0, [("x", 0)]))
        assert [c.client_id for c in sim.contributions(state, [4])] == [sim.corpus.clients[4].client_id]
        assert sim.executor._pool is not pool  # the simulation started new workers
    finally:
        sim.close()
    assert _no_worker_processes_left()


def test_a_killed_worker_process_stops_the_run_with_its_round_paid(tmp_path):
    import json
    import os
    import signal

    from privlm.runtime.workers import WorkerError

    sim = Simulation(load_config(None, [*TINY, "workers=2", "worker_kind=process"]))
    killed = []

    def kill_a_worker(row):
        if not killed:
            killed.append(sim.executor._pool.pids[1])
            os.kill(killed[0], signal.SIGKILL)
        return False

    with pytest.raises(WorkerError, match=r"privlm-client-1 .* exited with code -9"):
        sim.run(tmp_path / "run", progress=False, stop_when=kill_a_worker)
    assert _no_worker_processes_left()
    record = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert record["rounds_spent"] == 2  # round 2 was paid before its clients trained, and stays paid


# ------------------------------------------- the clients' tokens on disk (issue #18)

def _private_temp_folder(tmp_path, monkeypatch):
    """An empty temp folder for this process and the processes it starts: anything written there shows."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _tokens_in(folder, tokens: list[torch.Tensor]) -> list:
    """privlm's entries in ``folder``, and the files anywhere under it that hold a client's tokens
    (as the workers read them: int64); torch's own caches may be there too."""
    needles = [t.reshape(-1)[:64].to(torch.int64).numpy().tobytes() for t in tokens if t.numel() >= 16]
    mine = [p for p in folder.iterdir() if p.name.startswith(("privlm", ".privlm"))]
    return mine + [p for p in folder.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_worker_processes_keep_the_clients_tokens_in_the_run_dir_only_while_they_start(tmp_path, monkeypatch):
    """The tokens' file is written in the run directory, owner-only (whatever the umask), and
    unlinked once every worker has mapped it: nothing is left in the temp folder or on disk."""
    import os
    import stat

    from privlm.runtime import workers

    torch.set_num_threads(_worker_threads())  # the reference below trains with the workers' kernels
    sim = Simulation(load_config(None, TINY))
    tmp = _private_temp_folder(tmp_path, monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    modes = {}
    real_write = workers._write_private

    def write(path, array):
        real_write(path, array)
        modes[path.name] = stat.S_IMODE(os.stat(path).st_mode)

    monkeypatch.setattr(workers, "_write_private", write)
    umask = os.umask(0)
    try:
        pool = workers.ProcessWorkers(sim.cfg, 2, sim.train_tokens, run)
    finally:
        os.umask(umask)
    try:
        assert len(modes) == 2 and all(name.startswith(".privlm-worker-tokens-") for name in modes)
        assert set(modes.values()) == {0o600}
        assert _tokens_in(tmp, sim.train_tokens) == [] and list(run.iterdir()) == []  # the workers are ready
        # they still read every client's tokens, and each update is the sequential one to the bit
        state = dp_fedavg.init(sim.algo, get_params(sim.model))
        tasks = [(sim.corpus.clients[i].client_id, i) for i in (0, 1, 2, 7)]
        for (cid, i), (got, res) in zip(tasks, pool.train(state.params, 0, tasks), strict=True):
            ref = local_train(sim.model, state.params, sim.train_tokens[i], sim.local,
                                         client_generator(sim.cfg, 0, cid))
            assert got == cid and res.num_tokens == ref.num_tokens
            assert all(torch.equal(res.update[k], ref.update[k]) for k in ref.update)
    finally:
        procs = list(pool._procs)
        pool.close()
    assert [p.exitcode for p in procs] == [0, 0]  # each stopped when told to (not killed after the join's timeout)
    assert _no_worker_processes_left()
    assert _tokens_in(tmp, sim.train_tokens) == [] and list(run.iterdir()) == []


def test_worker_processes_that_cannot_start_leave_no_token_file(tmp_path, monkeypatch):
    from privlm.runtime.workers import ProcessWorkers, WorkerError

    tmp = _private_temp_folder(tmp_path, monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, [*TINY, f"model.tokenizer={tmp_path / 'missing.json'}"])  # fails in the workers
    tokens = [torch.arange(40), torch.arange(100, 130)]
    with pytest.raises(WorkerError, match="privlm-client-0 could not start"):
        ProcessWorkers(cfg, 2, tokens, run)
    assert _no_worker_processes_left()
    assert _tokens_in(tmp, tokens) == [] and list(run.iterdir()) == []


_OWNER = r"""
import sys, time
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.runtime import workers

phase, run = sys.argv[1], Path(sys.argv[2])
written = []
real_write = workers._write_private


def write(path, array):
    real_write(path, array)
    written.append(path)
    if phase == "start-up" and len(written) == 2:  # both token files are on disk; no worker yet
        print("written", flush=True)
        time.sleep(600)


workers._write_private = write
tokens = [torch.arange(i, i + 50) for i in range(0, 500, 100)]  # as _tokens_in looks for them
pool = workers.ProcessWorkers(load_config(None, sys.argv[3:]), 2, tokens, run)
print("started", *pool.pids, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie holds no files
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("phase", ["start-up", "started"])
def test_a_killed_run_leaves_no_tokens_in_the_temp_folder(tmp_path, monkeypatch, phase):
    """SIGKILL of the process that owns the workers: after start-up nothing is on disk; during it
    only the run directory's own token files, which ``remove_stale_token_files`` deletes."""
    import os
    import signal
    import stat
    import subprocess
    import sys
    import threading
    import time

    from privlm.runtime.workers import remove_stale_token_files

    tmp = _private_temp_folder(tmp_path, monkeypatch)  # the owner's temp folder (TMPDIR)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".foo.tmp").write_text("the user's")
    (run / "notes.npy").write_text("the user's")
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, phase, str(run), *TINY],
                             stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, owner.kill)  # a hung owner fails the test instead of hanging it
    watchdog.start()
    pids: list[int] = []
    try:
        said = owner.stdout.readline().split()
        assert said and said[0] == {"start-up": "written", "started": "started"}[phase], said
        pids = [int(p) for p in said[1:]]
        left = sorted(p.name for p in run.glob(".privlm-worker-tokens-*"))
        if phase == "start-up":
            assert len(left) == 2
            assert {stat.S_IMODE(os.stat(run / name).st_mode) for name in left} == {0o600}
        else:
            assert len(pids) == 2 and left == []
        os.kill(owner.pid, signal.SIGKILL)
        assert owner.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not all(map(_gone, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(map(_gone, pids))  # the workers exit when their owner's pipes close
    finally:
        watchdog.cancel()
        owner.kill()
        owner.wait()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert _tokens_in(tmp, [torch.arange(i, i + 50) for i in range(0, 500, 100)]) == []
    assert sorted(p.name for p in remove_stale_token_files(run)) == left  # a resume's clean-up
    assert sorted(p.name for p in run.iterdir()) == [".foo.tmp", "notes.npy"]
    assert remove_stale_token_files(run) == []
