"""The one boundary between the relay and the outside world."""

from __future__ import annotations

from typing import Protocol

from worker.intent import Intent


class Sink(Protocol):
    """Delivers intents of one kind.

    ``deliver`` returns normally on success and raises ``TransientError`` or
    ``PermanentError`` (from ``worker.errors``) otherwise; any other exception is treated
    as transient. It may be called from many tasks at once (one per delivery slot).
    """

    async def deliver(self, intent: Intent) -> None: ...

    async def aclose(self) -> None: ...
