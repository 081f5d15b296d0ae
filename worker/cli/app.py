"""Wires the parts together for `outbox-worker run`: pool, schema check, sinks, relay, signals."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from functools import partial

import anyio
import asyncpg

from worker.cli.startup import wait_for_database
from worker.cli.targets import check_targets, describe, log_targets
from worker.dashboard.summary import log_summaries
from worker.dashboard.view import run_dashboard
from worker.errors import ConfigError
from worker.observe.health import HealthMonitor
from worker.observe.stats import Stats
from worker.observe.tracing import from_env as tracer_from_env
from worker.relay.core import Relay
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.sinks.handlers import HandlerSink, load_handlers
from worker.store.db import behind_pooler, connect
from worker.store.grants import WORKER, privilege_error
from worker.store.migrate import ensure_schema
from worker.store.sqlfiles import Names

log = logging.getLogger("outbox")


def build_sinks(settings: Settings) -> dict[str, Sink]:
    """Every kind's sink (worker/sinks/registry.py), then the user's handlers over them."""
    from worker.sinks import registry
    from worker.sinks.limits import apply_limits, parse_limits

    limits = parse_limits(settings.limits)
    sinks = registry.build_sinks(settings, limits)
    if settings.handlers:
        for kind, fn in load_handlers(settings.handlers).items():
            if kind in sinks:
                log.info("kind %r: your handler replaces the built-in sink", kind)
            sinks[kind] = HandlerSink(fn)
    return apply_limits(sinks, limits)


async def prepare_schema(dsn: str, settings: Settings, names: Names) -> None:
    conn = await connect(dsn)
    try:
        await ensure_schema(conn, names, apply=settings.migrate)
        # Checked now, in one line, rather than met as a traceback at the first claim.
        lacking = await privilege_error(conn, names.schema, WORKER)
        if lacking is not None:
            raise ConfigError(lacking)
    finally:
        await conn.close()


async def run_worker(
    settings: Settings,
    dsn: str,
    *,
    stats: Stats | None = None,
    relay_holder: list[Relay] | None = None,
    dashboard: bool = False,
    title: str | None = None,
) -> None:
    names = Names(settings.schema, settings.channel)
    sinks = build_sinks(settings)
    pool = await wait_for_database(
        dsn, partial(prepare_schema, dsn, settings, names), application_name="outbox-worker"
    )
    if pool is None:  # stopped while waiting for the database
        return
    try:
        settings = await _through_pooler(settings, dsn)
        relay = Relay(
            pool=pool,
            dsn=dsn,
            settings=settings,
            sinks=sinks,
            stats=stats,
            tracer=tracer_from_env(),
        )
        if relay_holder is not None:
            relay_holder.append(relay)
        health = HealthMonitor(pool, relay.store, relay.stats)
        targets = describe(settings, sinks)
        log_targets(targets)
        async with (
            _http_endpoint(settings, relay, pool, health, sinks),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_stop_on_signals, relay)
            tg.start_soon(check_targets, targets)  # beside the relay: never delays the start
            if dashboard:
                tg.start_soon(health.run)
                tg.start_soon(partial(run_dashboard, relay, title=title))
            else:  # no terminal: the same numbers as a log line now and then
                tg.start_soon(log_summaries, relay, health)
            await relay.run()
            tg.cancel_scope.cancel()
    finally:
        await _close_sinks(sinks)
        await pool.close()


async def _through_pooler(settings: Settings, dsn: str) -> Settings:
    """Behind a pooler, LISTEN needs a connection of its own: a LISTEN through a transaction
    pooler is lost when its server connection goes back to the pool, and its backend pid (the
    idle flag producers read) is the pooler's. Without --listen-dsn, poll and say so."""
    pooled = settings.pooled or await behind_pooler(dsn)
    if pooled and not settings.pooled:
        log.info("the DSN is a pooler's (it refused a session setting): running as with --pooled")
    if pooled and settings.listen and settings.listen_dsn is None:
        log.warning(
            "behind a pooler without --listen-dsn: no LISTEN, new intents are found by the "
            "poll every %gs; give a direct DSN with --listen-dsn for instant pickup",
            settings.poll_interval,
        )
        return replace(settings, pooled=True, listen=False)
    return replace(settings, pooled=pooled)


@contextlib.asynccontextmanager
async def _http_endpoint(
    settings: Settings,
    relay: Relay,
    pool: asyncpg.Pool,
    health: HealthMonitor,
    sinks: Mapping[str, Sink],
) -> AsyncIterator[None]:
    """--http: open before the relay starts, closed after it has stopped
    (worker/observe/http_server.py)."""
    if settings.http is None:
        yield
        return
    from worker.observe.http_server import http_endpoint

    async with http_endpoint(settings.http, relay, pool, health, sinks):
        yield


async def _stop_on_signals(relay: Relay) -> None:
    """First SIGTERM/SIGINT/SIGHUP (terminal closed): graceful stop. Second: cancel in-flight
    deliveries now."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if relay.stopping:
                log.warning(
                    "%s again: cancelling in-flight deliveries", signal.Signals(signum).name
                )
                relay.hard_stop()
            else:
                log.info("%s received", signal.Signals(signum).name)
                relay.stop()


async def _close_sinks(sinks: Mapping[str, Sink]) -> None:
    for sink in set(sinks.values()):
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await sink.aclose()
