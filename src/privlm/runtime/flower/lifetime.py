"""Flower processes die with the process that started them (Linux ``PR_SET_PDEATHSIG``).

``privlm deploy-local`` starts a SuperLink and SuperNodes; they start the ServerApp and
ClientApp processes. A ``kill -9`` of privlm gives nothing a chance to clean up, so each
of them asks the kernel to SIGKILL it when its parent dies: the launcher's children in
``preexec_fn``, the app processes when privlm's app code starts in them.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def in_flower_app_process() -> bool:
    """Whether this process is a Flower-launched app process (flwr-serverapp / flwr-clientapp)."""
    return os.path.basename(sys.argv[0]) in ("flwr-serverapp", "flwr-clientapp") if sys.argv else False


def bind_app_process_to_parent() -> None:
    """In a flwr-serverapp / flwr-clientapp process: die with the SuperLink / SuperNode."""
    if in_flower_app_process():
        die_with_parent()
