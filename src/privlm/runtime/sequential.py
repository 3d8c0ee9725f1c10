"""The sequential executor: one client at a time, in this process, on the one model.

Each sampled client trains in turn and its update is handed on at once, so with the
streaming aggregator memory stays O(model) however many clients a round samples. In
example-level mode a client is a silo, trained with DP-SGD over its records.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import numpy as np

from privlm.engine.executor import Reply, ServerView
from privlm.federated.client import local_train
from privlm.federated.dp_sgd import dp_sgd_train
from privlm.mechanisms.base import Contribution
from privlm.runtime.clients import LocalExecutor, user_contribution
from privlm.runtime.training import client_generator, local_training
from privlm.seeds import derived_seed


class SequentialExecutor(LocalExecutor):
    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        cl = self.clients
        for i in ids:
            cid = cl.client_id(i)
            if cl.silo is not None:  # DP-SGD over the silo's records; all silos weigh the same
                data = cl.silos[i]
                res, _ = dp_sgd_train(cl.model, view.params, data.x, data.y, local_training(cl.cfg, view.round), cl.silo.dp,
                                      self._record_rng(view.round, cid),
                                      cl.noise.generator(view.round, stream=f"noise:{cid}"))
                if on_client:
                    on_client()
                yield Contribution(cid, res.update, 1.0, res.loss_sum / res.steps)
                continue
            res = local_train(cl.model, view.params, cl.train_tokens[i], local_training(cl.cfg, view.round),
                              client_generator(cl.cfg, view.round - 1, cid))
            if on_client:
                on_client()
            yield user_contribution(res, cid)

    def _record_rng(self, round_index: int, silo_id: str) -> np.random.Generator:
        """The Poisson sampling of a silo's records: part of the DP-SGD mechanism, so secret."""
        cfg = self.clients.cfg
        if cfg.privacy.seeded_noise:
            return np.random.default_rng(derived_seed(cfg.seed, f"records:{round_index}", silo_id))
        return np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
