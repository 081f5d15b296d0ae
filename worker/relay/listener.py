"""The dedicated LISTEN connection: wake-ups, health pings, reconnects, catch-up.

Not from the pool: asyncpg drops a listener when a pooled connection is released. NOTIFY is
only a hint (notifications are lost while disconnected), so every successful LISTEN is
followed by a catch-up wake-up, and the relay keeps polling all along.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg

from worker.backoff import retry_delay
from worker.logs import one_line
from worker.observe.outage import RETRY_CAP
from worker.observe.stats import Stats
from worker.relay.wakeup import Wakeup

log = logging.getLogger("outbox.listener")


class Listener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        wakeup: Wakeup,
        stats: Stats,
        *,
        ping_interval: float,
        ping_timeout: float,
        application_name: str,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._wakeup = wakeup
        self._stats = stats
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._application_name = application_name
        self.backend_pid: int | None = None  # for tests and the dashboard
        self._connected = False

    async def run(self) -> None:
        failures = 0
        while True:
            self._connected = False
            try:
                await self._session()
            except Exception as exc:  # never let the wake-up path take the relay down
                # A session that got as far as LISTEN resets the backoff. One line per
                # outage: the failed reconnects after it are debug lines.
                failures = 1 if self._connected else failures + 1
                if failures == 1:
                    log.warning(
                        "LISTEN connection lost (%s); polling until it is back", one_line(exc)
                    )
                else:
                    log.debug("LISTEN reconnect failed (%s)", one_line(exc))
            # Back off even after a clean drop, so a server that accepts and immediately
            # closes connections never makes us spin.
            await anyio.sleep(retry_delay(failures, base=0.5, cap=RETRY_CAP))

    async def _session(self) -> None:
        with anyio.fail_after(self._ping_timeout * 2):
            conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": self._application_name}
            )
        lost = anyio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            with anyio.fail_after(self._ping_timeout):
                await conn.add_listener(self._channel, self._on_notification)
            self.backend_pid = conn.get_server_pid()
            self._connected = True
            self._stats.on_listener(True)
            log.info("listening on channel %s", self._channel)
            self._wakeup.set()  # catch up on whatever was committed while we were away
            while not lost.is_set():
                with anyio.move_on_after(self._ping_interval):
                    await lost.wait()
                if lost.is_set():
                    break
                # A half-open TCP connection never reports itself closed: ask it.
                with anyio.fail_after(self._ping_timeout):
                    await conn.fetchval("SELECT 1")
            raise ConnectionResetError("server closed the LISTEN connection")
        finally:
            self._stats.on_listener(False)
            self.backend_pid = None
            conn.terminate()

    def _on_notification(self, *_args: Any) -> None:
        self._stats.on_notification()
        self._wakeup.set()
