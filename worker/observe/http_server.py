"""`--http HOST:PORT`: /metrics for Prometheus, /healthz and /readyz for Kubernetes probes.

aiohttp serves them on the worker's own event loop, so an answer from /healthz means the loop
is turning, and nothing here needs a thread or a lock. The listening socket is opened before
the worker starts (a port in use is a one-line start-up error) and closed after the relay
has stopped: during a graceful stop /readyz keeps answering, with 503.

Needs the `metrics` extra (prometheus-client and aiohttp); without it, only ``host_port``
below is imported (by the option parser).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

import anyio
import asyncpg

from worker.distribution import pip_install
from worker.errors import ConfigError
from worker.logs import one_line
from worker.observe.stats import redact
from worker.store.db import DB_UNAVAILABLE

if TYPE_CHECKING:
    from aiohttp import web

    from worker.observe.health import HealthMonitor
    from worker.relay.core import Relay

log = logging.getLogger("outbox.http")

# A readiness answer (one SELECT 1) is reused this long: probes from several kubelets or a
# curl loop never turn into a query each.
READY_CACHE_SECONDS = 1.0
READY_TIMEOUT = 2.0
# The queue gauges are read at most this often, however many scrapers there are.
HEALTH_MAX_AGE = 1.0
_DB_PROBLEMS: tuple[type[BaseException], ...] = (*DB_UNAVAILABLE, asyncpg.PostgresError)


def host_port(text: str) -> str:
    """``HOST:PORT`` (``[::1]:9187`` for IPv6, ``0.0.0.0:9187`` for every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return text


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def require_extra() -> None:
    """Fail at start-up, in one line, when the metrics extra is not installed."""
    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"--http needs the 'metrics' extra ({exc.name or 'a package'} is not installed): "
            f"{pip_install('metrics')}"
        ) from None


class Probes:
    """What /readyz answers: ready (None) or the one-line reason it is not."""

    def __init__(self, relay: Relay, pool: asyncpg.Pool) -> None:
        self._relay = relay
        self._pool = pool
        self._checked_at = -float("inf")
        self._db_problem: str | None = None

    async def not_ready(self) -> str | None:
        if self._relay.stopping:
            return "stopping: no new claims, finishing in-flight deliveries"
        now = time.monotonic()
        if now - self._checked_at >= READY_CACHE_SECONDS:
            self._db_problem = await self._ask_database()
            self._checked_at = time.monotonic()
        return self._db_problem

    async def _ask_database(self) -> str | None:
        try:
            # fail_after, not the query's timeout: it bounds getting a connection too.
            with anyio.fail_after(READY_TIMEOUT):
                await self._pool.fetchval("SELECT 1")
        except _DB_PROBLEMS as exc:
            return f"database unreachable: {redact(one_line(exc))}"
        return None


@contextlib.asynccontextmanager
async def http_endpoint(
    address: str,
    relay: Relay,
    pool: asyncpg.Pool,
    health: HealthMonitor,
    kinds: Iterable[str],
) -> AsyncIterator[None]:
    """Listen on ``address`` for as long as the block runs."""
    require_extra()
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    from worker.observe.metrics import relay_registry

    exposition = make_aiohttp_handler(relay_registry(relay, kinds))
    probes = Probes(relay, pool)
    stats = relay.stats
    stats.timings = True  # the histograms of /metrics

    async def metrics(request: web.Request) -> web.StreamResponse:
        read_at = stats.db_read_at
        if read_at is None or stats.clock() - read_at >= HEALTH_MAX_AGE:
            # Bounded: waiting for a pool connection has no timeout of its own, and a scrape
            # that times out loses every other metric too.
            with anyio.move_on_after(READY_TIMEOUT) as scope:
                await health.refresh()
            if scope.cancelled_caught:
                stats.on_db_health_failed("the queue health query timed out")
        return await exposition(request)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        reason = await probes.not_ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=reason + "\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    # No access log: a scrape a second would drown the worker's own lines.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        host, port = split_address(address)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(f"--http {address}: cannot listen ({one_line(exc)})") from None
        log.info("serving /metrics, /healthz and /readyz on %s", address)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
