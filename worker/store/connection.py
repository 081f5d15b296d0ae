"""One connection kept open for one sequential user: the claim loop, the outcome writer.

A pooled query pays for the pool's reset (``UNLISTEN *; RESET ALL; ...``) after every
statement, one more round trip; a connection that only one task ever uses needs none.
After any failure other than a statement's own error (network, server restart, timeout, a
failover: the server became read-only, a broken client protocol state, a cancelled call) it
is dropped, and the next statement reconnects, through the DSN's hosts to the one that takes
writes. A lock makes "one operation at a time" a property of the connection, not a promise
of its callers: asyncpg refuses a second one in flight with an error that names neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import asyncpg

from worker.store.db import COMMAND_TIMEOUT, CONNECT_TIMEOUT, DB_UNAVAILABLE, init_connection


class DedicatedConnection:
    def __init__(
        self,
        dsn: str,
        application_name: str,
        settings: dict[str, str] | None = None,
        *,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._server_settings = {"application_name": application_name, **(settings or {})}
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
                server_settings=self._server_settings,
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
                conn = await self._connection()
            except DB_UNAVAILABLE:
                self._dropped = True
                raise
            try:
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
