"""The privacy-critical path: clip -> noise -> event -> ledger -> epsilon.

Everything a DP reviewer needs to audit lives in this package:

* ``mechanism.py``  - L2 clipping of a whole update and the Gaussian noise draw.
* ``ledger.py``     - the append-only list of dp-accounting events, as JSON.
* ``accountant.py`` - epsilon from a ledger (PLD or RDP), calibration, budget check.

Training code only *describes* what it did (a ``DpEvent`` per round); the
accountant alone turns the ledger into epsilon.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from privlm.privacy.accountant import (
        calibrate_noise_multiplier,
        default_delta,
        epsilon,
        epsilon_for,
        round_event,
    )
    from privlm.privacy.ledger import Ledger, LedgerEntry, event_from_dict, event_to_dict
    from privlm.privacy.mechanism import NoiseSource, add_gaussian_noise, clip_update, global_l2_norm

# Lazy (PEP 562): ``privlm epsilon`` and config checks need the accountant, not torch.
_WHERE = {
    "calibrate_noise_multiplier": "accountant", "default_delta": "accountant", "epsilon": "accountant",
    "epsilon_for": "accountant", "round_event": "accountant",
    "Ledger": "ledger", "LedgerEntry": "ledger", "event_from_dict": "ledger", "event_to_dict": "ledger",
    "NoiseSource": "mechanism", "add_gaussian_noise": "mechanism", "clip_update": "mechanism",
    "global_l2_norm": "mechanism",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"privlm.privacy.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'privlm.privacy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "Ledger",
    "LedgerEntry",
    "NoiseSource",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_update",
    "default_delta",
    "epsilon",
    "epsilon_for",
    "event_from_dict",
    "event_to_dict",
    "global_l2_norm",
    "round_event",
]
