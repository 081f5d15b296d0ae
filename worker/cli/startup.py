"""`run`'s start-up: wait for the database rather than exit while it is unavailable.

A worker started while PostgreSQL is down, restarting or failing over (every host of a
multi-host DSN still read-only) would otherwise exit, and systemd's or Kubernetes's
restart policy would turn the outage into a crash loop with a growing restart delay
(CrashLoopBackOff) that outlasts the outage itself. So it waits: a bounded backoff, one log
line when the wait starts and one when it ends, and SIGTERM/SIGINT end the wait with exit
status 0. A configuration error (wrong password, unknown database, bad DSN) no wait can
fix: it still stops the start with one line and exit status 2.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import anyio
import asyncpg

from worker.errors import ConfigError, DatabaseUnavailable
from worker.observe.outage import Outage
from worker.store.db import DB_UNAVAILABLE, connect_error, create_pool, unavailable

log = logging.getLogger("outbox")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def wait_for_database(
    dsn: str, prepare: Callable[[], Awaitable[None]], *, application_name: str
) -> asyncpg.Pool | None:
    """``prepare()`` (the schema check), then the pool; retried while the database is
    unavailable. None if a stop signal came first."""
    result: asyncpg.Pool | Exception | None = None  # stays None if a signal ends the wait
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_signal, tg.cancel_scope)
        # Raised outside the task group: inside, anyio would wrap it in an ExceptionGroup.
        result = await _open(dsn, prepare, application_name)
        tg.cancel_scope.cancel()
    if isinstance(result, Exception):
        raise result
    return result


async def _open(
    dsn: str, prepare: Callable[[], Awaitable[None]], application_name: str
) -> asyncpg.Pool | Exception:
    outage = Outage(log, "start-up")
    while True:
        try:
            await prepare()
            pool = await create_pool(dsn, max_size=5, application_name=application_name)
        except DatabaseUnavailable as exc:  # connecting failed: the message names the DSN
            await anyio.sleep(outage.failed(str(exc)))
        except DB_UNAVAILABLE as exc:  # lost after connecting (during the schema check)
            if not unavailable(exc):
                return ConfigError(connect_error(dsn, exc))
            await anyio.sleep(outage.failed(connect_error(dsn, exc)))
        except Exception as exc:  # ConfigError and the like: reported by the caller
            return exc
        else:
            outage.recovered()
            return pool


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("%s received while waiting for the database", signal.Signals(signum).name)
            scope.cancel()
            return
