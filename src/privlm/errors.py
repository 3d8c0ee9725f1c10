"""Errors that the CLI turns into one clear line and exit code 2 (no traceback)."""

from __future__ import annotations


class PrivlmError(Exception):
    """Base class for user-facing errors: bad config, bad data, impossible budgets."""


class ConfigError(PrivlmError):
    """A configuration key has a bad value; the message names the key."""


class DataError(PrivlmError):
    """Input data is missing or malformed; the message names the file (and line)."""
