"""One coalescing "there may be work" signal, set by NOTIFY, freed slots or scheduled retries."""

from __future__ import annotations

import anyio


class Wakeup:
    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        """Safe from a plain callback (asyncpg's notification callback runs on the loop)."""
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for a signal or ``timeout`` seconds; True if signalled.

        Signals that arrive while nobody waits are kept, so a NOTIFY that lands during a
        claim wakes the next wait at once instead of being lost.
        """
        if not self._event.is_set():
            with anyio.move_on_after(max(timeout, 0.0)):
                await self._event.wait()
        fired = self._event.is_set()
        if fired:
            self._event = anyio.Event()
        return fired
