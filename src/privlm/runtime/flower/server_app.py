"""The privlm ServerApp: the round engine, with Flower nodes as the clients.

:class:`FlowerExecutor` is an executor (:mod:`privlm.engine.executor`): it finds the
population (every registered node says who it is), sends the global parameters to the
sampled nodes and streams their replies to the engine, which does everything else --
budget check, durable ledger entry, Poisson sampling, validation, clipping, noise, server
step, checkpoints, ``privacy.json`` -- exactly as in process. There is no second
implementation of the algorithm.

The population N is the set of nodes registered when the run starts (each node is one
client: a phone, a hospital); the guarantee in ``privacy.json`` says so. A sampled node that
fails, times out or answers with something malformed contributes nothing and is counted
(``dropped`` or ``rejected``); the denominator stays q*N, so the ledger is the same as
without the fault.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from privlm import build
from privlm.config import RunConfig, load_config
from privlm.engine.executor import Dropout, Population, Reply, ServerView
from privlm.engine.rounds import Engine
from privlm.errors import ConfigError, DataError, FederationError
from privlm.mechanisms.base import Contribution
from privlm.runtime.flower import codec
from privlm.runtime.flower.lifetime import bind_app_process_to_parent
from privlm.runtime.training import eval_client_indices

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


class FlowerExecutor:
    """Clients that are Flower nodes reached through ``grid``."""

    # Replies are yielded as they arrive (no waiting on the slowest node), so the float64 sum's order,
    # and its last bits, can differ from the sequential stream's: not a pure function of the round.
    deterministic = False

    def __init__(self, cfg: RunConfig, grid: Grid, num_nodes: int) -> None:
        if cfg.privacy.mode == "example":
            raise ConfigError('privacy.mode: "example" (DP-SGD in each silo) runs in process only for now; '
                              'use "user" or "none" with Flower')
        if cfg.audit.canaries or cfg.audit.update_canaries:
            raise ConfigError("audit: canaries are planted by the in-process simulation only; "
                              "set audit.canaries = 0 and audit.update_canaries = 0 for Flower runs")
        if cfg.data.pseudo_users is not None:
            raise ConfigError("data.pseudo_users: a Flower node is one data owner; pseudo-users are "
                              "for in-process simulations only")
        self.cfg, self.grid, self.num_nodes = cfg, grid, num_nodes
        self.node_ids: list[int] = []
        self.client_ids: list[str] = []
        self.population = self._query_population()
        self.eval_clients = eval_client_indices(cfg.seed, len(self.node_ids), cfg.eval.max_clients)

    def start(self, run_dir: Path) -> None:
        pass

    def close(self) -> None:
        pass

    # -- the population: ask every registered node who it is ------------------
    def _query_population(self) -> Population:
        cfg = self.cfg
        nodes = self._wait_for_nodes(cfg.flower.node_wait)
        replies = self._exchange(nodes, "query", RecordDict({codec.CONFIG: ConfigRecord({"config": cfg.to_toml()})}),
                                 cfg.flower.node_wait)
        members: list[tuple[int, str, int]] = []
        scrub_counts: Counter[str] = Counter()
        for node, reply in replies.items():
            if reply is None or reply.has_error():
                why = reply.error.reason if reply is not None else "no answer"
                raise DataError(f"node {node}: did not load its data ({why[:300]})")
            info = codec.content_record(reply, codec.CONFIG)
            if not isinstance(info, ConfigRecord) or not isinstance(info.get("client_id"), str):
                raise DataError(f"node {node}: its answer to the start-up query names no client_id")
            order = info.get("partition_id", -1)
            members.append((order if isinstance(order, int) else -1, info["client_id"], node))
            scrub_counts.update({k.removeprefix("scrubbed:"): v for k, v in info.items()
                                 if k.startswith("scrubbed:") and isinstance(v, int)})
        members.sort()
        ids = [m[1] for m in members]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise DataError(f"nodes claim the same client id(s) {dup[:3]}: each node must hold its own data")
        self.node_ids, self.client_ids = [m[2] for m in members], ids
        log.info("population: %d nodes: %s", len(ids), ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))
        # the nodes actually used (more than num_nodes may have registered), never the expected count
        return Population(tuple(ids), f"the {len(ids)} Flower nodes registered when the run started, each one client",
                          "flower", dict(scrub_counts) if cfg.data.scrub_enabled else None,
                          {"num_clients": len(ids)})

    def _wait_for_nodes(self, seconds: float) -> list[int]:
        deadline = time.monotonic() + seconds
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.num_nodes:
                if len(nodes) > self.num_nodes:
                    log.warning("%d nodes registered, more than the %d expected; using all of them "
                                "as the population", len(nodes), self.num_nodes)
                return nodes
            if time.monotonic() > deadline:
                raise FederationError(f"only {len(nodes)} of {self.num_nodes} nodes registered within "
                                      f"flower.node_wait = {seconds:g} s")
            time.sleep(0.2)

    # -- messaging --------------------------------------------------------------
    def _push(self, nodes: list[int], kind: str, content: RecordDict, group: str) -> dict[str, int]:
        """The same content to each of ``nodes`` (as Flower's own strategies send it); message id -> node."""
        messages = [Message(content=content, dst_node_id=n, message_type=kind, group_id=group) for n in nodes]
        return dict(zip(self.grid.push_messages(messages), nodes))

    def _replies(self, pending: dict[str, int], timeout: float) -> Iterator[tuple[int, Message]]:
        """Replies as they arrive; leaves in ``pending`` those that never came."""
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            got = False
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    got = True
                    yield node, reply
            if not got:
                time.sleep(POLL_SECONDS)

    def _exchange(self, nodes: list[int], kind: str, content: RecordDict, timeout: float
                  ) -> dict[int, Message | None]:
        pending = self._push(nodes, kind, content, kind)
        answers: dict[int, Message | None] = {n: None for n in nodes}
        for node, reply in self._replies(pending, timeout):
            answers[node] = reply
        return answers

    # -- the executor protocol ------------------------------------------------------
    def contributions(self, view: ServerView, ids: list[int],
                      on_client: Callable[[], None] | None = None) -> Iterator[Reply]:
        """Send the global parameters to the sampled nodes; yield their updates as they arrive."""
        if not ids:
            return
        round_index = view.round
        content = RecordDict({codec.PARAMS: codec.to_record(view.params),
                              codec.CONFIG: ConfigRecord({"round": round_index})})
        pending = self._push([self.node_ids[i] for i in ids], "train", content, str(round_index))
        client_of = {self.node_ids[i]: self.client_ids[i] for i in ids}
        for node, reply in self._replies(pending, self.cfg.flower.round_timeout):
            cid = client_of[node]
            if reply.has_error():
                log.warning("round %d: node %s (%s) failed: %s", round_index, node, cid, reply.error.reason[:300])
                yield Dropout(cid, "failed")
                continue
            update = codec.from_record(codec.content_record(reply, codec.UPDATE), view.params)
            metrics = codec.content_record(reply, codec.METRICS)
            weight, loss = _number(metrics, "num_tokens"), _number(metrics, "train_loss")
            if on_client:
                on_client()
            # A string update (undecodable) is rejected and logged by the mechanism's preprocessing.
            yield Contribution(cid, update, weight if weight is not None else math.nan, loss)
        for node in pending.values():
            log.warning("round %d: node %s (%s) did not answer within flower.round_timeout = %g s",
                        round_index, node, client_of[node], self.cfg.flower.round_timeout)
            yield Dropout(client_of[node], "timeout")

    def evaluate(self, params) -> tuple[float, float]:
        """Federated evaluation: each node scores its own held-out text; sums are pooled."""
        answers = self._exchange([self.node_ids[i] for i in self.eval_clients], "evaluate",
                                 RecordDict({codec.PARAMS: codec.to_record(params)}), self.cfg.flower.round_timeout)
        loss_sum = correct = count = 0.0
        for node, reply in answers.items():
            m = codec.content_record(reply, codec.METRICS) if reply is not None and not reply.has_error() else None
            values = [_number(m, k) for k in ("loss_sum", "correct", "count")]
            if any(v is None or v < 0 for v in values) or values[1] > values[2] or values[2] > 1e12:
                log.warning("evaluation: node %s gave no usable answer; left out", node)
                continue
            loss_sum, correct, count = loss_sum + values[0], correct + values[1], count + values[2]
        if count == 0:
            return math.nan, math.nan
        return loss_sum / count, correct / count


def flower_engine(cfg: RunConfig, grid: Grid, num_nodes: int) -> Engine:
    """The run's engine over the nodes of ``grid`` (at least ``num_nodes`` must register)."""
    return build.with_executor(cfg, FlowerExecutor(cfg, grid, num_nodes))


def _number(record: object, key: str) -> float | None:
    try:
        value = record[key]  # type: ignore[index]
    except Exception:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run config keys: ``config`` (resolved privlm TOML on the server), ``run-dir``, ``nodes``."""
    bind_app_process_to_parent()  # a flwr-serverapp process dies with its SuperLink
    rc = context.run_config
    cfg = load_config(Path(str(rc["config"])), [])
    result = flower_engine(cfg, grid, int(rc["nodes"])).run(Path(str(rc["run-dir"])), progress=False)
    log.info("privlm run finished: %d rounds, epsilon %s", result.rounds_completed, result.epsilon)
