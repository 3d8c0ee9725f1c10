"""Federated learning as pure functions over explicit state (FedJAX style).

* ``client.py``      - local training on one client's text -> update (local - global).
* ``aggregation.py`` - validation, clipping into a streaming sum, the noised mean.
* ``server_opt.py``  - server optimizers (FedAvg, FedAdam) applied to the mean update.
* ``dp_fedavg.py``   - one round: ``init`` / ``apply`` over a ``ServerState``.

Nothing here knows about processes, sockets or files: runtimes call these.
"""
