"""privlm: federated language-model training with user-level differential privacy.

Notebook use::

    from privlm import load_config, run
    cfg = load_config(overrides=["federation.rounds=5"])
    result = run(cfg, out="runs/demo")
    result.epsilon, result.eval_accuracy
"""

from privlm.config import RunConfig, load_config
from privlm.errors import ConfigError, DataError, FederationError, PrivlmError

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing privlm should not pull in torch until a run is asked for.
    if name in ("run", "resume", "RunResult"):
        from privlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'privlm' has no attribute {name!r}")
__all__ = ["RunConfig", "RunResult", "load_config", "run", "resume", "PrivlmError", "ConfigError",
           "DataError", "FederationError", "__version__"]
