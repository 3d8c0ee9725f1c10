"""The privacy-critical path: clip -> noise -> event -> ledger -> epsilon.

Everything a DP reviewer needs to audit lives in this package:

* ``mechanism.py``  - L2 clipping of a whole update and the Gaussian noise draw.
* ``ledger.py``     - the append-only list of dp-accounting events, as JSON.
* ``accountant.py`` - epsilon from a ledger (PLD or RDP), calibration, budget check.

Training code only *describes* what it did (a ``DpEvent`` per round); the
accountant alone turns the ledger into epsilon.
"""

from privlm.privacy.accountant import (
    calibrate_noise_multiplier,
    default_delta,
    epsilon,
    epsilon_for,
    round_event,
)
from privlm.privacy.ledger import Ledger, LedgerEntry, event_from_dict, event_to_dict
from privlm.privacy.mechanism import (
    NoiseSource,
    add_gaussian_noise,
    clip_update,
    global_l2_norm,
)

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
