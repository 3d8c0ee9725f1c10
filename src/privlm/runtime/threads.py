"""The thread executor: ``workers`` clients train at once, each thread on its own model replica.

Each client's training is the same function on the same inputs as in the sequential
executor (its own generator, the global params), and the updates are yielded in the order
of ``ids``, so the server sees exactly the sequential stream. At most 2 x workers updates
are held at once: memory is O(workers x model), never O(clients x model).
"""

from __future__ import annotations

import copy
import logging
import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from privlm.engine.executor import Reply, ServerView
from privlm.federated.client import local_train
from privlm.runtime.clients import LocalClients, LocalExecutor, has_dropout, user_contribution
from privlm.runtime.training import client_generator, local_training

log = logging.getLogger(__name__)


class ThreadExecutor(LocalExecutor):
    def __init__(self, clients: LocalClients, workers: int) -> None:
        super().__init__(clients)
        self.workers = workers
        self._replicas: list[torch.nn.Module] = []
        # Dropout draws from torch's one global generator; with clients in parallel threads the
        # order of draws, and so the masks, depend on timing: such a run is not reproducible.
        self.deterministic = not has_dropout(clients.model)
        if not self.deterministic:
            log.warning("workers = %d with dropout: dropout masks depend on thread timing, so this "
                        "run is not bit-reproducible (a resumed round is paid for again)", workers)

    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        cl, w = self.clients, self.workers
        local = local_training(cl.cfg, view.round)
        if len(self._replicas) < w:
            self._replicas += [copy.deepcopy(cl.model) for _ in range(w - len(self._replicas))]
        free: queue.SimpleQueue = queue.SimpleQueue()
        for m in self._replicas[:w]:
            free.put(m)

        def train(i: int, gen: torch.Generator):
            model = free.get()
            try:
                return local_train(model, view.params, cl.train_tokens[i], local, gen)
            finally:
                free.put(model)

        pool = ThreadPoolExecutor(max_workers=w, thread_name_prefix="privlm-client")
        pending: deque = deque()  # (client id, future), in the order of ids
        try:
            for n, i in enumerate(ids, 1):
                cid = cl.client_id(i)
                pending.append((cid, pool.submit(train, i, client_generator(cl.cfg, view.round - 1, cid))))
                while pending and (len(pending) >= 2 * w or n == len(ids)):
                    cid0, fut = pending.popleft()
                    res = fut.result()
                    if on_client:
                        on_client()
                    yield user_contribution(res, cid0)
        finally:  # also when the consumer stops early (a rejected round, a crash): no stray work
            pool.shutdown(wait=True, cancel_futures=True)
