"""Which PostgreSQL the bench runs against, what it is, and one fresh schema per run."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import asyncpg

from worker.settings import default_channel
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names, quote_ident

SETTINGS_REPORTED = (
    "fsync",
    "synchronous_commit",
    "shared_buffers",
    "wal_sync_method",
    "max_connections",
)


def socket_address(dsn: str) -> tuple[str, int] | str:
    """(host, port) for TCP, or the Unix socket path (the embedded server has no port)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    port = int(query.get("port", [parts.port or 5432])[0])
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


async def server_info(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        info: dict[str, Any] = {"version": await conn.fetchval("SHOW server_version")}
        for name in SETTINGS_REPORTED:
            info[name] = await conn.fetchval(f"SHOW {name}")
        try:  # superusers and pg_read_all_settings only; for the fdatasync test's file
            info["data_directory"] = await conn.fetchval("SHOW data_directory")
        except asyncpg.InsufficientPrivilegeError:
            info["data_directory"] = None
        return info
    finally:
        await conn.close()


def new_names(prefix: str) -> Names:
    schema = f"bench_{prefix}_{secrets.token_hex(3)}"
    return Names(schema, default_channel(schema))


@contextlib.asynccontextmanager
async def fresh_schema(dsn: str, prefix: str, *, outbox: bool = True) -> AsyncIterator[Names]:
    """A new schema (with the outbox tables and main's triggers when ``outbox``), dropped
    afterwards so runs never see each other's rows, bloat or triggers."""
    names = new_names(prefix)
    conn = await asyncpg.connect(dsn)
    try:
        if outbox:
            await migrate(conn, names)
        else:
            await conn.execute(f"CREATE SCHEMA {quote_ident(names.schema)}")
        yield names
    finally:
        # Shielded: an interrupted run (Ctrl-C) still drops its schema.
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(names.schema)} CASCADE")
            finally:
                await conn.close()
