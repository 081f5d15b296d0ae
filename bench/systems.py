"""The systems under test, behind one small interface: install into a fresh schema, seed a
backlog, produce one intent per transaction, tell whether anything is left, and start a
worker. The scenarios drive them all the same way."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import orjson

from bench import producers
from bench.server import fresh_schema
from bench.sql import query
from worker.store.sqlfiles import Names


@dataclass(frozen=True)
class Installed:
    dsn: str
    names: Names  # schema and channel of this run


class System(Protocol):
    name: str
    kind: str  # bench.child kind
    tree: Path | None  # the checkout bench.child runs from (None: this one)

    def install(self, dsn: str) -> contextlib.AbstractAsyncContextManager[Installed]: ...
    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None: ...
    def unfinished_sql(self, inst: Installed) -> str: ...
    def producers(
        self, inst: Installed, n: int
    ) -> contextlib.AbstractAsyncContextManager[list[producers.Enqueue]]: ...
    def worker_config(self, inst: Installed) -> dict[str, Any]: ...


class RelaySystem:
    name = "outbox-worker"
    kind = "relay"
    tree: Path | None = None

    @contextlib.asynccontextmanager
    async def install(self, dsn: str) -> AsyncIterator[Installed]:
        async with fresh_schema(dsn, "relay") as names:
            yield Installed(dsn, names)

    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None:
        await conn.execute(query("seed", inst.names), n, "bench")

    def unfinished_sql(self, inst: Installed) -> str:
        return query("unfinished", inst.names)

    def producers(
        self, inst: Installed, n: int
    ) -> contextlib.AbstractAsyncContextManager[list[producers.Enqueue]]:
        return producers.relay_producers(inst.dsn, inst.names, n)

    def worker_config(self, inst: Installed) -> dict[str, Any]:
        return {"dsn": inst.dsn, "schema": inst.names.schema, "channel": inst.names.channel}

    def default(self, setting: str) -> Any:
        """The relay's default for ``setting`` (a Settings field), in the checkout it runs."""
        from worker.settings import Settings

        return {f.name: f.default for f in dataclasses.fields(Settings)}[setting]


@dataclasses.dataclass
class KeyedRelaySystem(RelaySystem):
    """The relay with every intent on one of ``keys`` ordering keys (intent k on key k mod
    keys): the backlog interleaves the keys, as many aggregates writing at once do."""

    keys: int = 1

    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None:
        await conn.execute(query("seed_keyed", inst.names), n, "bench", self.keys)

    def producers(
        self, inst: Installed, n: int
    ) -> contextlib.AbstractAsyncContextManager[list[producers.Enqueue]]:
        return producers.relay_producers(inst.dsn, inst.names, n, keys=self.keys)


class PgqueuerSystem:
    name = "pgqueuer"
    kind = "pgqueuer"
    tree: Path | None = None

    @contextlib.asynccontextmanager
    async def install(self, dsn: str) -> AsyncIterator[Installed]:
        from pgqueuer import AsyncpgDriver

        from bench.child import pgqueuer_queries

        async with fresh_schema(dsn, "pgq", outbox=False) as names:
            conn = await asyncpg.connect(dsn)
            try:
                queries = pgqueuer_queries(AsyncpgDriver(conn), names.schema, names.channel)
                await queries.install(create_schema=False)
            finally:
                await conn.close()
            yield Installed(dsn, names)

    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None:
        from pgqueuer import AsyncpgDriver

        from bench.child import pgqueuer_queries

        queries = pgqueuer_queries(AsyncpgDriver(conn), inst.names.schema, inst.names.channel)
        for start in range(0, n, 5000):
            keys = range(start, min(n, start + 5000))
            await queries.enqueue(
                ["bench"] * len(keys), [orjson.dumps({"k": k}) for k in keys], [0] * len(keys)
            )

    def unfinished_sql(self, inst: Installed) -> str:
        return query("pgqueuer_unfinished", inst.names)

    def producers(
        self, inst: Installed, n: int
    ) -> contextlib.AbstractAsyncContextManager[list[producers.Enqueue]]:
        return producers.pgqueuer_producers(inst.dsn, inst.names.schema, inst.names.channel, n)

    def worker_config(self, inst: Installed) -> dict[str, Any]:
        return {"dsn": inst.dsn, "schema": inst.names.schema, "channel": inst.names.channel}


class ProcrastinateSystem:
    name = "procrastinate"
    kind = "procrastinate"
    tree: Path | None = None

    @contextlib.asynccontextmanager
    async def install(self, dsn: str) -> AsyncIterator[Installed]:
        from bench.child import procrastinate_app

        async with fresh_schema(dsn, "proc", outbox=False) as names:
            app = procrastinate_app(dsn, names.schema, "procrastinate install", 2)
            async with app.open_async():
                await app.schema_manager.apply_schema_async()
            yield Installed(dsn, names)

    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None:
        from bench.child import procrastinate_app

        app = procrastinate_app(inst.dsn, inst.names.schema, "procrastinate seed", 2)
        async with app.open_async():
            deferrer = app.configure_task(name="bench")
            for start in range(0, n, 5000):
                await deferrer.batch_defer_async(
                    *({"k": k} for k in range(start, min(n, start + 5000)))
                )

    def unfinished_sql(self, inst: Installed) -> str:
        return query("procrastinate_unfinished", inst.names)

    def producers(
        self, inst: Installed, n: int
    ) -> contextlib.AbstractAsyncContextManager[list[producers.Enqueue]]:
        return producers.procrastinate_producers(inst.dsn, inst.names.schema, n)

    def worker_config(self, inst: Installed) -> dict[str, Any]:
        return {"dsn": inst.dsn, "schema": inst.names.schema, "channel": inst.names.channel}


def alternatives_installed() -> dict[str, bool]:
    found = {}
    for module in ("pgqueuer", "procrastinate"):
        try:
            __import__(module)
            found[module] = True
        except ImportError:
            found[module] = False
    return found
