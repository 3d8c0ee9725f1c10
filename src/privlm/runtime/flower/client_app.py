"""The privlm ClientApp: one data owner's side, on the owner's machine.

A node is one client. Its text never leaves it: on the server's start-up
``query`` the node loads its own data (node config, below), scrubs PII with
:func:`privlm.data.scrub.scrub_client` exactly like the in-process simulation,
tokenises it and keeps the tokens in the node's run state; only its client id
and per-type scrub counts go back. On ``train`` it runs
:func:`privlm.federated.client.local_train` from the global parameters and
returns ``local - global``; on ``evaluate`` it returns the loss sum, correct
count and token count of its held-out text.

Node config (``flower-supernode --node-config``), one of:

- ``partition-id=P num-partitions=K``: part P of the run's own data set
  (``[data]`` of the config): silo P as ``data.silos = K`` merges them (what
  ``privlm deploy-local`` gives each node), or, when the config sets no silos,
  client P itself (Flower's simulation engine, one virtual node per client).
- ``data-path="/srv/notes" client-id="hospital-a"`` (optional
  ``data-source="dir"|"jsonl"``): the owner's own directory or JSONL file; all
  of it is this one client.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import privlm.data as _data
from privlm.config import RunConfig, config_from_toml
from privlm.data.corpus import ClientData, FederatedCorpus, merge_clients, silo_members
from privlm.data.scrub import scrub_corpus, settings_for_run
from privlm.errors import ConfigError
from privlm.federated.client import evaluate_sums, local_train
from privlm.runtime.flower import codec
from privlm.runtime.flower.lifetime import bind_app_process_to_parent
from privlm.runtime.training import build_model, client_generator, local_training

log = logging.getLogger(__name__)

STATE = "privlm"  # the node's run state: config text, client id (ConfigRecord) and tokens (ArrayRecord)

app = ClientApp()
bind_app_process_to_parent()  # a flwr-clientapp process dies with its SuperNode


def load_own_data(cfg: RunConfig, node_config: dict) -> tuple[ClientData, int, dict[str, int] | None]:
    """This node's one client (scrubbed if the run scrubs), its order key and scrub counts."""
    if "partition-id" in node_config:
        p, k = node_config.get("partition-id"), node_config.get("num-partitions")
        if not isinstance(p, int) or not isinstance(k, int) or not 0 <= p < k:
            raise ConfigError(f"node config: partition-id={p!r} num-partitions={k!r} must be integers "
                              "with 0 <= partition-id < num-partitions")
        corpus = _corpus(cfg.data.source, cfg.data.path, cfg.data.num_clients, cfg.seed)
        if cfg.data.silos is None:  # one node per client of the data
            if k != corpus.num_clients:
                raise ConfigError(f"node config: num-partitions={k} but the data has {corpus.num_clients} "
                                  "clients; one node per client (or set data.silos)")
            members, client_id = [corpus.clients[p]], corpus.clients[p].client_id
        else:
            if k != cfg.data.silos:
                raise ConfigError(f"node config: num-partitions={k} but data.silos = {cfg.data.silos}")
            try:
                members = silo_members(corpus, k)[p]
            except ValueError as e:
                raise ConfigError(str(e)) from None
            client_id = f"silo-{p}"
        order = p
    elif "data-path" in node_config:
        source = str(node_config.get("data-source", "dir"))
        client_id = node_config.get("client-id")
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError("node config: data-path needs client-id=\"...\" (this data owner's name)")
        corpus = _data.load_corpus(source, Path(str(node_config["data-path"])), None, cfg.seed)
        members, order = list(corpus.clients), -1
    else:
        raise ConfigError("node config: give partition-id and num-partitions, or data-path and client-id")
    counts = None
    settings = settings_for_run(cfg)
    if settings is not None:  # each member scrubbed on its own, as in the simulation
        scrubbed, counts = scrub_corpus(FederatedCorpus("node", tuple(members), {}), settings, progress=False,
                                        workers=1)
        members = list(scrubbed.clients)
    return merge_clients(client_id, members), order, counts


@functools.lru_cache(maxsize=2)
def _corpus(source: str, path, num_clients, seed: int):
    """The data set, read once per process (a Ray actor serves many virtual nodes)."""
    return _data.load_corpus(source, path, num_clients, seed)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Start-up: load, scrub and tokenise this node's data; say who we are."""
    config_text = codec.content_record(msg, codec.CONFIG)["config"]
    cfg, _, tok = _setup(config_text)
    client, order, counts = load_own_data(cfg, dict(context.node_config))
    train, test = tok.encode(client.train), tok.encode(client.test)
    context.state[STATE] = ConfigRecord({"config": config_text, "client_id": client.client_id})
    context.state[STATE + ":tokens"] = ArrayRecord({"train": Array(train.numpy()), "test": Array(test.numpy())})
    info: dict = {"client_id": client.client_id, "partition_id": order}
    for k, v in (counts or {}).items():
        info[f"scrubbed:{k}"] = int(v)
    log.info("node ready: client %s, %d training tokens", client.client_id, train.numel())
    return Message(RecordDict({codec.CONFIG: ConfigRecord(info)}), reply_to=msg)


@functools.lru_cache(maxsize=1)
def _setup(config_text: str) -> tuple[RunConfig, torch.nn.Module, object]:
    """The run's config, model and tokenizer, built once per process for a run.

    Safe to share between messages (and between the virtual nodes one Ray actor
    serves): local training and evaluation set every trainable parameter from
    the message before they use the model.
    """
    cfg = config_from_toml(config_text, "the run config the server sent")
    model, tok = build_model(cfg)
    return cfg, model, tok


def _restore(context: Context) -> tuple[RunConfig, str, torch.nn.Module, dict[str, torch.Tensor]]:
    if STATE not in context.state:
        raise RuntimeError("this node has not loaded its data (no start-up query in this run)")
    saved = context.state[STATE]
    cfg, model, _ = _setup(saved["config"])
    tokens = {k: torch.from_numpy(v.numpy()) for k, v in context.state[STATE + ":tokens"].items()}
    return cfg, str(saved["client_id"]), model, tokens


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the global parameters; the update is ``local - global``."""
    cfg, client_id, model, tokens = _restore(context)
    round_index = int(codec.content_record(msg, codec.CONFIG)["round"])
    params = codec.from_record(codec.content_record(msg, codec.PARAMS))
    if isinstance(params, str):
        raise ValueError(f"global parameters unusable: {params}")
    res = local_train(model, params, tokens["train"], local_training(cfg, round_index),
                      client_generator(cfg, round_index - 1, client_id))
    metrics = MetricRecord({"num_tokens": res.num_tokens,
                            "train_loss": res.loss_sum / res.steps if res.steps else float("nan")})
    return Message(RecordDict({codec.UPDATE: codec.to_record(res.update), codec.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy sums over this node's held-out text."""
    cfg, _, model, tokens = _restore(context)
    params = codec.from_record(codec.content_record(msg, codec.PARAMS))
    if isinstance(params, str):
        raise ValueError(f"global parameters unusable: {params}")
    test = [tokens["test"]] if tokens["test"].numel() > 1 else []
    loss_sum, correct, count = evaluate_sums(model, params, test, cfg.eval.batch_size)
    return Message(RecordDict({codec.METRICS: MetricRecord(
        {"loss_sum": loss_sum, "correct": correct, "count": count})}), reply_to=msg)


__all__ = ["app", "load_own_data"]
