"""Client training in worker processes, for the in-process simulation (``worker_kind = "process"``).

Threads (``worker_kind = "thread"``) cannot use a second core on small clients: their
work is Python dispatching small torch operations, which holds the GIL. Here each of
W spawned processes builds the model from the run's config (as a Flower ClientApp
does) and trains the clients it is sent with the very same ``local_train`` and
per-client generator, so the updates are those of ``workers = 1`` (to the bit with the
same number of torch threads; dropout included, as each client seeds the process's
generator).

Only raw tensor bytes and JSON headers cross the pipes; nothing a worker sends is
unpickled (the config reaches a worker once, when it is spawned by this process).
Every client's tokens are written once to a file that the workers map read-only; it
lies in the run directory (never the system temp folder: nothing derived from clients'
data leaves the run directory), is readable by its owner only, and is unlinked as soon
as every worker has mapped it, so a run killed after start-up leaves no copy on disk.
A round's global parameters go to every worker once; then a task (a few bytes:
round, client) goes out and the client's update comes back. Task ``k`` goes to
worker ``k mod W``, each worker holds at most two, and the updates are read back
in task order, so the server sees exactly the sequential stream and at most 2W
updates are in flight. A worker sends its replies from a thread of its own, so it trains
its next client while the simulation is still busy with other workers' updates. A worker
that dies is an error for the round (its entry is already paid), and every worker exits
when the simulation closes or its pipe does.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import secrets
import sys
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from privlm.errors import FederationError
from privlm.federated.client import ClientResult, local_train
from privlm.models.factory import build_model
from privlm.rundir import TOKEN_FILE_PREFIX, remove_stale_token_files  # noqa: F401
from privlm.runtime.training import client_generator, local_training, threads_per_worker

Params = dict[str, torch.Tensor]


_ALIGN = 8  # each tensor's bytes start at a multiple of 8, so any dtype can view them


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _to_bytes(tensors: list[torch.Tensor]) -> memoryview:
    """The tensors' raw bytes (any dtype, bfloat16 included), each padded to 8 bytes."""
    parts = []
    for t in tensors:
        raw = t.detach().reshape(-1).contiguous().view(torch.uint8)
        parts.append(raw)
        if _padded(raw.numel()) != raw.numel():
            parts.append(torch.zeros(_padded(raw.numel()) - raw.numel(), dtype=torch.uint8))
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return memoryview(flat.numpy())


def _from_bytes(buf: bytearray, layout: list[list]) -> Params:
    """Tensors by name from :func:`_to_bytes`'s bytes and their (name, dtype, shape) layout."""
    sizes = [_dtype(dtype).itemsize * math.prod(shape) for _, dtype, shape in layout]
    if sum(map(_padded, sizes)) != len(buf):
        raise ValueError(f"{len(buf)} bytes for a layout of {sum(map(_padded, sizes))}")
    raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    out, offset = {}, 0
    for (name, dtype, shape), n in zip(layout, sizes):
        out[name] = raw[offset:offset + n].view(_dtype(dtype)).view(shape)  # a view of buf, which it keeps alive
        offset += _padded(n)
    return out


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _layout(params: Params) -> list[list]:
    """``[name, dtype, shape]`` per tensor, as it reads back from JSON."""
    return [[k, str(v.dtype), list(v.shape)] for k, v in params.items()]


def _write_private(path: Path, array) -> None:  # array: np.ndarray
    """Save ``array`` to a new file that only its owner can read (no world-readable window)."""
    import numpy as np

    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # refuses an existing file or link
    with os.fdopen(fd, "wb") as f:
        np.save(f, array, allow_pickle=False)


class _Replies:
    """A worker's replies, sent in order by one thread of its own.

    A pipe holds 64 KB and an update is usually much more, so a send waits until the
    simulation reads it, which it does in task order; meanwhile the worker already trains
    its next client (it holds at most two tasks, so at most one update waits here).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._send_all, name="privlm-worker-replies", daemon=True)
        self._thread.start()

    def _send_all(self) -> None:
        while (item := self._queue.get()) is not None:
            header, payload = item
            try:
                self._conn.send_bytes(header)
                if payload is not None:
                    self._conn.send_bytes(payload)
            except (EOFError, OSError):  # the simulation is gone
                os._exit(0)

    def put(self, header: dict, payload=None) -> None:
        self._queue.put((json.dumps(header).encode(), payload))

    def flush(self) -> None:
        """Wait until every reply so far is sent (then no more may be put)."""
        self._queue.put(None)
        self._thread.join()


def _worker_main(conn: Connection, cfg, threads: int, tokens_path: str) -> None:  # cfg: RunConfig
    """A worker process: build the model, then train the clients it is sent until told to stop."""
    import numpy as np

    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)  # as the simulation does before it builds its model
        model, _ = build_model(cfg)
        # Both files are read or mapped before "ready": the pool then unlinks them (a mapping
        # outlives its file's name).
        offsets = np.load(tokens_path + ".offsets.npy", allow_pickle=False)
        flat = np.load(tokens_path + ".npy", mmap_mode="r", allow_pickle=False)  # shared page cache, read-only
    except Exception:  # noqa: BLE001 - the simulation reports it before any round is paid
        conn.send_bytes(json.dumps({"error": traceback.format_exc(limit=5)}).encode())
        return
    conn.send_bytes(json.dumps({"ready": True}).encode())
    replies = _Replies(conn)
    params: Params = {}
    layout: list = []
    while True:
        try:
            header = json.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the simulation is gone
            return
        op = header["op"]
        if op == "stop":  # nothing else to write: skip the interpreter's teardown (~1 s with torch)
            replies.flush()
            conn.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            if op == "params":
                layout = header["layout"]
                params = _from_bytes(bytearray(conn.recv_bytes()), layout)
                continue
            i = header["client"]
            tokens = torch.from_numpy(np.array(flat[offsets[i]:offsets[i + 1]]))
            res = local_train(model, params, tokens, local_training(cfg, header["round"] + 1),
                              client_generator(cfg, header["round"], header["cid"]))
            update = {name: res.update[name] for name, _, _ in layout}  # in the parameters' order
            if _layout(update) != layout or len(update) != len(res.update):
                raise ValueError("the update's tensors differ from the global parameters' layout")
            replies.put({"num_tokens": res.num_tokens, "loss_sum": res.loss_sum, "steps": res.steps},
                        _to_bytes(list(update.values())))  # (a new buffer, not touched again here)
        except Exception:  # noqa: BLE001 - reported to the simulation, which stops the run
            replies.put({"error": traceback.format_exc(limit=5)})


class WorkerError(FederationError):
    """A worker process died or failed to train a client."""


class ProcessWorkers:
    """W spawned processes that train clients for the in-process simulation.

    Any failure (a worker's error, a dead worker, a garbled message) marks the pool
    ``broken``: it is never read from again, so no update can be taken for another
    client's. The simulation then stops the run (or, used directly, starts a new pool).

    ``workdir`` (the run directory) holds the clients' tokens only while the workers start:
    see the module's docstring and :func:`remove_stale_token_files`.
    """

    def __init__(self, cfg, workers: int, tokens: list[torch.Tensor], workdir: Path) -> None:
        import numpy as np

        ctx = mp.get_context("spawn")  # never fork a process that has torch's threads running
        self._conns: list[Connection] = []
        self._procs: list = []
        self._busy: list[deque] = [deque() for _ in range(workers)]  # client ids in flight, per worker
        self._layout: list = []
        self._nbytes = 0
        self.broken = False
        path = str(Path(workdir) / f"{TOKEN_FILE_PREFIX}{secrets.token_hex(16)}")
        self._token_files = [Path(path + ".offsets.npy"), Path(path + ".npy")]
        try:
            # Every client's tokens, once, in a file the workers map read-only: a task names
            # a client by index and carries no data.
            _write_private(self._token_files[0], np.cumsum([0] + [t.numel() for t in tokens], dtype=np.int64))
            _write_private(self._token_files[1], torch.cat([t.reshape(-1).to(torch.int64) for t in tokens]).numpy()
                           if tokens else np.zeros(0, dtype=np.int64))
            for i in range(workers):
                parent, child = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_worker_main, args=(child, cfg, threads_per_worker(workers), path),
                                daemon=True, name=f"privlm-client-{i}")
                p.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(p)
            for w in range(workers):  # each has built its model: failures show before any round
                try:
                    header = json.loads(self._conns[w].recv_bytes())
                except (EOFError, OSError) as e:
                    raise self._died(w) from e
                if "error" in header:
                    raise WorkerError(f"{self._procs[w].name} could not start:\n{header['error']}")
            self._remove_token_files()  # every worker has mapped them
        except BaseException:
            self.close()
            raise

    def _remove_token_files(self) -> None:
        for f in self._token_files:
            f.unlink(missing_ok=True)
        self._token_files = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _send(self, w: int, header: dict, payload=None) -> None:
        try:
            self._conns[w].send_bytes(json.dumps(header).encode())
            if payload is not None:
                self._conns[w].send_bytes(payload)
        except (EOFError, OSError) as e:
            raise self._died(w) from e

    def _died(self, w: int) -> WorkerError:
        p = self._procs[w]
        p.join(timeout=1)
        return WorkerError(f"client worker process {p.name} (pid {p.pid}) exited with code {p.exitcode}")

    def _receive(self, w: int) -> ClientResult:
        cid = self._busy[w].popleft()
        name = self._procs[w].name
        try:
            header = json.loads(self._conns[w].recv_bytes())
            if "error" in header:
                raise WorkerError(f"client {cid}: training failed in {name}:\n{header['error']}")
            buf = bytearray(self._nbytes)  # the update's own buffer (its tensors are views of it)
            if self._conns[w].recv_bytes_into(buf) != self._nbytes:
                raise WorkerError(f"client {cid}: {name} sent an update of the wrong size")
            update = _from_bytes(buf, self._layout)
            return ClientResult(update=update, num_tokens=int(header["num_tokens"]),
                                loss_sum=float(header["loss_sum"]), steps=int(header["steps"]))
        except (EOFError, OSError) as e:
            raise self._died(w) from e
        except (mp.BufferTooShort, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise WorkerError(f"client {cid}: {name} sent a malformed reply ({type(e).__name__}: {e})") from e

    def train(self, params: Params, round_index: int, tasks: list[tuple[str, int]]
              ) -> Iterator[tuple[str, ClientResult]]:
        """``(client id, result)`` for each ``(client id, client index)`` task, in task order.

        ``round_index`` is the number of completed rounds (as ``client_generator`` takes it).
        Each worker holds up to two tasks (the next one is waiting when it finishes one);
        a task is a few bytes, so sending one never waits on a busy worker. Closing the
        iterator early waits for the updates still in flight and drops them.
        """
        if self.broken or not self._conns:
            raise WorkerError("the client worker processes were stopped after an error; start new ones")
        self._layout = _layout(params)
        payload = _to_bytes(list(params.values()))
        self._nbytes = payload.nbytes
        n = len(self._conns)

        def submit(k: int) -> None:
            cid, index = tasks[k]
            self._busy[k % n].append(cid)
            self._send(k % n, {"op": "train", "round": round_index, "cid": cid, "client": index})

        try:
            for w in range(n):
                self._send(w, {"op": "params", "layout": self._layout}, payload)
            for k in range(min(2 * n, len(tasks))):
                submit(k)
            for k in range(len(tasks)):
                res = self._receive(k % n)
                if k + 2 * n < len(tasks):
                    submit(k + 2 * n)  # the same worker: it finds its next task waiting
                yield tasks[k][0], res
        except GeneratorExit:  # the consumer stopped early: drop the updates still in flight
            self._drain()
            raise
        except BaseException:
            self.broken = True
            raise

    def _drain(self) -> None:
        try:
            for w in range(len(self._conns)):
                while self._busy[w]:
                    self._receive(w)
        except WorkerError:
            self.broken = True

    def close(self) -> None:
        """Stop every worker (closing the pipes ends one still sending), then kill stragglers."""
        self._remove_token_files()  # (already gone unless the workers failed to start)
        for conn in self._conns:
            try:
                conn.send_bytes(json.dumps({"op": "stop"}).encode())
            except (EOFError, OSError):
                pass
            conn.close()
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._conns = [], []
        self.broken = True
