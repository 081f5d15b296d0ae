"""One connection kept open for one sequential user: the claim loop, the outcome writer.

A pooled query pays for the pool's reset (``UNLISTEN *; RESET ALL; ...``) after every
statement, one more round trip; a connection that only one task ever uses needs none.
After any failure other than a statement's own error (network, server restart, timeout, a
failover: the server became read-only, a broken client protocol state, a cancelled call) it
is dropped, and the next statement reconnects, through the DSN's hosts to the one that takes
writes. A lock makes "one operation at a time" a property of the connection, not a promise
of its callers: asyncpg refuses a second one in flight with an error that names neither.

Directly on PostgreSQL its statements are prepared once and its settings are the session's
(one round trip per statement). Behind a pooler (``pooled``) nothing may outlive a
transaction: statements are unnamed and the settings are ``SET LOCAL`` in a transaction
around each statement (four round trips instead of one; per claim, not per intent). A pooler
found on the way (it refused the settings, or a named statement vanished) switches it to
that mode by itself, with one line; the statement that met it had not run, so it runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg

from worker.store.db import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    DB_UNAVAILABLE,
    POOLED_STATEMENT_ERRORS,
    init_connection,
    refused_by_pooler,
)

log = logging.getLogger("outbox.connection")

_REPREPARE_AFTER = 30  # seconds


class DedicatedConnection:
    def __init__(
        self,
        dsn: str,
        application_name: str,
        settings: dict[str, str] | None = None,
        *,
        pooled: bool = False,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._name = application_name
        # The code's own constants (never input): spliced into SET LOCAL when pooled.
        self._settings = settings or {}
        self.pooled = pooled
        self._conn: asyncpg.Connection | None = None
        self._on_reconnect = on_reconnect
        self._dropped = False  # a connection was lost: the next connect is a reconnect
        self._busy = anyio.Lock()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and self._conn.is_closed():  # lost while idle
            self._drop()
        if self._conn is None:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                statement_cache_size=0 if self.pooled else 100,
                # Prepared again this often, so a generic plan chosen while the table was
                # small (a seq scan for the claim's id = ANY, a hash join over every
                # processing entry for the outcome write: seen under a held xmin, where no
                # ANALYZE came to invalidate them) lasts at most this long. Planning every
                # execution instead (plan_cache_mode=force_custom_plan) cost 16 % of the
                # drain at concurrency 64 and 30 % more PostgreSQL CPU, measured.
                max_cached_statement_lifetime=_REPREPARE_AFTER,
                server_settings={
                    "application_name": self._name,
                    **({} if self.pooled else self._settings),
                },
            )
            await init_connection(conn)
            self._conn = conn
            if self._dropped and self._on_reconnect is not None:
                self._on_reconnect()
            self._dropped = False
        return self._conn

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._run("fetch", query, args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, args)

    async def execute(self, query: str, *args: Any) -> None:
        await self._run("execute", query, args)

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        async with self._busy:
            try:
                return await self._run_once(method, query, args)
            except Exception as exc:
                if self.pooled or not (
                    refused_by_pooler(exc) or isinstance(exc, POOLED_STATEMENT_ERRORS)
                ):
                    raise
            self._found_pooler()
            return await self._run_once(method, query, args)

    async def _run_once(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        try:
            conn = await self._connection()
        except DB_UNAVAILABLE:
            self._dropped = True
            raise
        try:
            if self.pooled and self._settings:
                return await self._in_transaction(conn, method, query, args)
            return await getattr(conn, method)(query, *args)
        except asyncpg.PostgresError as exc:
            # The statement failed and the connection is fine (a unique violation, say),
            # unless the error is the connection's own.
            if isinstance(exc, DB_UNAVAILABLE):
                self._drop()
            raise
        except BaseException:
            self._drop()
            raise

    async def _in_transaction(
        self, conn: asyncpg.Connection, method: str, query: str, args: tuple[Any, ...]
    ) -> Any:
        settings = "; ".join(
            f"SET LOCAL {name} = {value}" for name, value in self._settings.items()
        )
        await conn.execute(f"BEGIN; {settings}")
        try:
            result = await getattr(conn, method)(query, *args)
        except BaseException:
            if not conn.is_closed():
                with anyio.CancelScope(shield=True):
                    await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
        return result

    def _found_pooler(self) -> None:
        self._drop()
        self._dropped = False  # not an outage: the same server, reached another way
        self.pooled = True
        log.warning(
            "%s: the connection goes through a pooler (PgBouncer or the like) in transaction "
            "or session mode: statements unnamed, settings per transaction from now on; "
            "start with --pooled to say so up front",
            self._name,
        )

    def _drop(self) -> None:
        self._dropped = True
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            try:
                await self._conn.close(timeout=2)
            except Exception:  # closing is best effort; the server cleans up
                self._conn.terminate()
        self._conn = None
