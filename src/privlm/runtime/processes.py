"""The process executor: ``workers`` clients train at once in worker processes
(:mod:`privlm.runtime.workers`), each with the same ``local_train`` and per-client generator
as the sequential executor; the updates come back in the order of ``ids``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from privlm.engine.executor import Reply, ServerView
from privlm.runtime.clients import LocalClients, LocalExecutor, user_contribution
from privlm.runtime.workers import ProcessWorkers


class ProcessExecutor(LocalExecutor):
    def __init__(self, clients: LocalClients, workers: int) -> None:
        super().__init__(clients)
        self.workers = workers
        self._pool: ProcessWorkers | None = None
        self.workdir: Path | None = None  # the run directory: the clients' token files, while workers start

    deterministic = True  # each worker seeds its own generator for each client

    def start(self, run_dir: Path | None = None) -> None:
        """Start the worker processes, or new ones after an error."""
        if run_dir is not None:
            self.workdir = run_dir
        if self._pool is not None and self._pool.broken:
            self.close()
        if self._pool is None:
            if self.workdir is None:
                raise ValueError("worker processes need the run directory for the clients' token files")
            self._pool = ProcessWorkers(self.clients.cfg, self.workers, self.clients.train_tokens, self.workdir)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        self.start()
        assert self._pool is not None
        tasks = [(self.clients.client_id(i), i) for i in ids]
        stream = self._pool.train(view.params, view.round - 1, tasks)
        try:
            for cid, res in stream:
                if on_client:
                    on_client()
                yield user_contribution(res, cid)
        finally:
            stream.close()  # now, not whenever the generator is collected
