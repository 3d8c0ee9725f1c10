"""Mechanisms: one module each, with explicit state, preprocessing, release, event, description.

* :class:`GaussianFedAvg` -- user-level DP-FedAvg, fixed clip (``gaussian``);
* :class:`AdaptiveClipGaussian` -- the same with adaptive clipping (``adaptive``);
* :class:`NonPrivateFedAvg` -- FedAvg without DP (``nonprivate``);
* :class:`SiloDPSGD` -- example-level DP-SGD in silos, the server's plain mean (``silo``);
* :class:`BandedMF` -- banded matrix factorization, noise correlated across rounds (``banded_mf``).
"""

from privlm.mechanisms.adaptive import AdaptiveClipGaussian, AdaptiveClipping
from privlm.mechanisms.banded_mf import BandedMF
from privlm.mechanisms.base import Contribution, Mechanism, MechanismState, Preprocessed
from privlm.mechanisms.gaussian import GaussianFedAvg
from privlm.mechanisms.nonprivate import NonPrivateFedAvg
from privlm.mechanisms.silo import SiloDPSGD

__all__ = ["AdaptiveClipGaussian", "AdaptiveClipping", "BandedMF", "Contribution", "GaussianFedAvg",
           "Mechanism", "MechanismState", "NonPrivateFedAvg", "Preprocessed", "SiloDPSGD"]
