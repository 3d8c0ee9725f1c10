"""Crash injection for the crash-safety tests (never active unless asked for).

Setting ``PRIVLM_CRASH_AT=<point>:<n>`` makes the process SIGKILL itself, with
no chance to clean up, the moment it reaches ``<point>`` for the n-th time
(``<point>`` is a named step of a round, e.g. ``ledger-written:3`` is round 3
right after its ledger entry became durable; ``mid-write:7`` is the 7th atomic
file write, after its temp file is complete but before the rename). The tests
and ``tools/chaos.py`` use it to prove that a resume after a crash at every
step neither loses nor under-counts anything. ``PRIVLM_ENOSPC_AT=<n>`` makes the n-th atomic
write fail half-way with ENOSPC (a full disk). Unset, a call costs one lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def fault_point(name: str, n: int | None = None) -> None:
    """Die here if ``PRIVLM_CRASH_AT`` names this point (and its round or count)."""
    spec = os.environ.get("PRIVLM_CRASH_AT")
    if not spec:
        return
    if n is None:  # counted points: the n-th time we get here
        n = _counts[name] = _counts.get(name, 0) + 1
    if spec == f"{name}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def enospc_point() -> None:
    """Fail this write with ENOSPC if ``PRIVLM_ENOSPC_AT=<n>`` names it (the n-th atomic write of
    the process): a full disk at every write point, for the tests (tests/test_hostile_input.py)."""
    spec = os.environ.get("PRIVLM_ENOSPC_AT")
    if not spec:
        return
    n = _counts["enospc"] = _counts.get("enospc", 0) + 1
    if spec == str(n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
