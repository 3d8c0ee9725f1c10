"""``runtime = "flower-simulation"``: the same run on Flower's simulation engine (Ray backend).

A SuperLink is started with ``--simulation`` on 127.0.0.1 and the privlm Flower
App is submitted with one virtual SuperNode per client of the data (per silo
if ``data.silos`` is set). Flower runs each ClientApp in a pool of Ray actors;
the ServerApp is the same :class:`~privlm.runtime.flower.server_app.FlowerServer`
as in deployment, so the round -- sampling, clipping, noise, ledger -- is the
in-process one.

To spread the clients over an existing Ray cluster, set ``flower.ray_address``
(e.g. ``"auto"`` on a cluster node, or ``"ray://head:10001"``): it becomes
``RAY_ADDRESS`` for the simulation process, which ``ray.init()`` then joins.
Each ClientApp asks for ``flower.client_cpus`` CPUs of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import privlm.data as _data
from privlm.config import RunConfig
from privlm.data.corpus import silo_members
from privlm.errors import ConfigError
from privlm.runtime.flower.deploy import Federation, prepare_run_dir, run_federation

log = logging.getLogger(__name__)


def run_flower_simulation(cfg: RunConfig, out: Path | None = None, progress: bool = True,
                          run_timeout: float = 24 * 3600.0) -> Path:
    """Run ``cfg`` on Flower's simulation engine; returns the run directory."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError('runtime: "flower-simulation" needs Ray: pip install "flwr[simulation]==1.42.0"') from None
    # One virtual SuperNode per client of the data, or per silo. Splitting here too means bad
    # data or an impossible split fails once, not in every node.
    corpus = _data.corpus_of(cfg)
    nodes = corpus.num_clients
    if cfg.data.silos is not None:
        try:
            nodes = len(silo_members(corpus, cfg.data.silos))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    rd, root = prepare_run_dir(cfg, out)
    fed = Federation(root, 0, simulation=True, ray_address=cfg.flower.ray_address)
    return run_federation(fed, rd, cfg, nodes, {"num-supernodes": nodes,
                                                "client-resources-num-cpus": cfg.flower.client_cpus},
                          progress=progress, run_timeout=run_timeout)
