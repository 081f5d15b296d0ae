"""Exceptions a sink or user handler raises to say what should happen to an intent."""

from __future__ import annotations


class DeliveryError(Exception):
    """Base class: the delivery did not happen."""


class TransientError(DeliveryError):
    """Try again later (4xx SMTP reply, broker down, timeout...).

    ``retry_after`` (seconds) overrides the worker's backoff for this retry, e.g. from an
    HTTP ``Retry-After`` header.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Deferred(DeliveryError):
    """Not now, and not the intent's fault (its kind is at its limit): put it back in the
    queue without counting the attempt, due again in ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """Never try again: the intent is marked ``dead`` with this message."""


class ConfigError(Exception):
    """Bad configuration (flag, environment variable, URL); shown to the operator as one line."""


class DatabaseUnavailable(ConfigError):
    """The database could not be reached or cannot take writes right now (down, restarting,
    failing over). A one-shot command reports it like a ConfigError; ``run`` waits for it."""
