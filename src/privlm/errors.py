"""Errors that the CLI turns into one clear line and exit code 2 (no traceback)."""

from __future__ import annotations


class PrivlmError(Exception):
    """Base class for user-facing errors: bad config, bad data, impossible budgets."""


class ConfigError(PrivlmError):
    """A configuration key has a bad value; the message names the key."""


class DataError(PrivlmError):
    """Input data is missing or malformed; the message names the file (and line)."""


class FederationError(PrivlmError):
    """A runtime or federation failure: a node, worker process or Flower process that failed.

    The run's ledger stays as paid: every round that started is counted, whether or not it
    finished, so the privacy spent so far is never understated.
    """
