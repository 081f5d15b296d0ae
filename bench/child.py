"""One worker under test, in its own process: ``python -m bench.child '<json config>'``.

A separate process so that its CPU is its own (and measurable), and so the producers in the
parent never share an event loop or a GIL with it. Driven by JSON lines:

    child -> {"event": "ready"}                    set up (pool open), not yet working
    parent -> {"cmd": "go"}
    child -> {"event": "running", "t0": ...}        working; t0 = just before it started
    parent -> {"cmd": "wait", "count": n, "timeout": s}
    child -> {"event": "handled", "count": n, "t": ...}   n handlers have run (t: when)
    parent -> {"cmd": "info"}                       -> {"event": "info", ...}
    (config "per_intent": false: no handler times are kept, ``starts`` is empty)
    parent -> {"cmd": "stop"}                       -> {"event": "stopped", "starts": [...]}

``starts`` are ``[k, t]`` pairs: the handler for the intent whose payload carries ``k``
started at ``t``. Every time is ``time.monotonic()``, which on Linux is one clock for all
processes, so the parent subtracts its own commit times from them directly.

Kinds: ``relay`` (worker.relay.core.Relay on worker.store.db.create_pool, as ``outbox-worker run``
wires it), ``bare`` (a SKIP LOCKED claim-and-delete loop: the floor), ``pgqueuer`` and
``procrastinate`` (each driven through its public API).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import anyio
import anyio.abc
import orjson

log = logging.getLogger("bench.child")


class Recorder:
    """Counts handler runs and remembers when each started and finished.

    ``per_intent=False`` keeps the count only: a worker that drains a million intents must
    not have its memory measured with two million timestamps of the bench's own in it."""

    def __init__(self, per_intent: bool = True) -> None:
        self.starts: list[tuple[int, float]] = []
        self.finishes: list[float] = []
        self._per_intent = per_intent
        self._count = 0
        self._target = 0
        self._target_at: float | None = None
        self._reached = anyio.Event()

    @property
    def done(self) -> int:
        return self._count

    def started(self, k: int) -> None:
        if self._per_intent:
            self.starts.append((k, time.monotonic()))

    def finished(self) -> None:
        now = time.monotonic()
        self._count += 1
        if self._per_intent:
            self.finishes.append(now)
        if self._target and self._count == self._target:
            self._target_at = now
            self._reached.set()

    async def wait_for(self, count: int, timeout: float) -> float | None:
        """When the ``count``-th handler finished (None if it did not within ``timeout``;
        without per-intent times, when this call saw it done)."""
        if self.done < count:
            self._target, self._target_at, self._reached = count, None, anyio.Event()
            with anyio.move_on_after(timeout):
                await self._reached.wait()
            self._target = 0
            if self._target_at is not None and not self._per_intent:
                return self._target_at
        if self.done < count:
            return None
        return self.finishes[count - 1] if self._per_intent else time.monotonic()


def key_of(payload: Any, default: int) -> int:
    if isinstance(payload, dict) and isinstance(payload.get("k"), int):
        return int(payload["k"])
    return default


class Worker(Protocol):
    async def setup(self) -> None: ...
    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None: ...
    def stop(self) -> None: ...
    def info(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


# --- the relay ---------------------------------------------------------------------------


class RelayWorker:
    def __init__(self, cfg: dict[str, Any], rec: Recorder) -> None:
        self.cfg, self.rec = cfg, rec

    async def setup(self) -> None:
        from worker.relay.core import Relay
        from worker.settings import Settings
        from worker.sinks.handlers import HandlerSink
        from worker.store.db import create_pool

        cfg = self.cfg
        # The relay's own defaults for whatever the scenario does not set.
        tunable = ("concurrency", "batch_size", "poll_interval", "listen")
        self.settings = Settings(
            dsn=cfg["dsn"],
            schema=cfg["schema"],
            channel=cfg["channel"],
            # The email sink's server (worker/sinks/email/spec.py).
            sink_options={"smtp_url": cfg["smtp_url"]} if "smtp_url" in cfg else {},
            **{key: cfg[key] for key in tunable if key in cfg},
        )
        self.pool = await create_pool(
            cfg["dsn"], max_size=5, application_name=f"outbox-worker {cfg['tag']}"
        )
        rec = self.rec

        async def noop(intent: Any) -> None:
            rec.started(key_of(intent.payload, intent.id))
            rec.finished()

        sinks: dict[str, Any] = {"bench": HandlerSink(noop)}
        if cfg.get("sink") in ("email", "naive_email"):
            sinks["email"] = _timed(self._email_sink(cfg["sink"]), rec)
        self.sinks = sinks
        self.relay = Relay(
            pool=self.pool,
            dsn=cfg["dsn"],
            settings=self.settings,
            sinks=sinks,
            worker_id=cfg["tag"],
            tracer=_tracer() if cfg.get("trace") else None,
        )
        if cfg.get("time_claims"):
            self.claim_times = _time_claims(self.relay.store)
        # Listening before "go", as `outbox-worker run` does before its relay starts: the
        # drain measures serving, not importing aiohttp.
        self._endpoint = contextlib.AsyncExitStack()
        await self._endpoint.enter_async_context(self._http())

    def _email_sink(self, which: str) -> Any:
        from worker.cli.app import build_sinks

        pooled = build_sinks(self.settings)["email"]
        cfg = self.cfg
        if which == "email":
            return pooled
        return NaiveEmailSink(cfg["smtp_host"], cfg["smtp_port"], cfg.get("smtp_cafile"))

    def _http(self) -> contextlib.AbstractAsyncContextManager[None]:
        """``--http`` as `outbox-worker run` serves it, when the scenario sets ``http``."""
        if not self.cfg.get("http"):
            return contextlib.nullcontext()
        from worker.observe.health import HealthMonitor
        from worker.observe.http_server import http_endpoint

        stats = self.relay.stats
        health = HealthMonitor(self.pool, self.relay.store, stats)
        return http_endpoint(self.cfg["http"], self.relay, self.pool, health, self.sinks)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.relay.run)
            if self.settings.listen:
                with anyio.fail_after(10):
                    # Stats are plain counters, with no event to wait on.
                    while not self.relay.stats.listener_connected:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
            task_status.started()

    def stop(self) -> None:
        self.relay.stop()

    def info(self) -> dict[str, Any]:
        stats = self.relay.stats
        listener = self.relay.listener
        return {
            "notifications": stats.notifications,
            "listener_connected": stats.listener_connected,
            "listener_pid": listener.backend_pid if listener else None,
            "claimed": stats.claimed,
            "sent": sum(stats.sent.values()),
            "claim_times": getattr(self, "claim_times", []),
        }

    async def close(self) -> None:
        await self._endpoint.aclose()
        for sink in {id(s): s for s in self.sinks.values()}.values():
            await sink.aclose()
        await self.pool.close()


def _time_claims(store: Any) -> list[tuple[float, float]]:
    """Time every claim statement the worker runs (the xmin scenario: pg_stat_statements is
    seldom preloaded): (monotonic end, seconds) of each, in a list the caller keeps."""
    times: list[tuple[float, float]] = []

    def timed(claim: Any) -> Any:
        async def timed_claim(*args: Any, **kwargs: Any) -> Any:
            begin = time.monotonic()
            try:
                return await claim(*args, **kwargs)
            finally:
                end = time.monotonic()
                times.append((end, end - begin))

        return timed_claim

    # The claim loop's method: claim_from (a floor) where the checkout has it, else claim.
    name = "claim_from" if hasattr(store, "claim_from") else "claim"
    setattr(store, name, timed(getattr(store, name)))
    return times


def _tracer() -> Any:
    """Delivery spans through the OpenTelemetry SDK, batched to memory: what the spans cost,
    not what an exporter does."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from worker.observe.otel import DeliveryTracer

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    return DeliveryTracer(provider)


def _timed(sink: Any, rec: Recorder) -> Any:
    class Timed:
        async def deliver(self, intent: Any) -> None:
            rec.started(intent.id)
            await sink.deliver(intent)
            rec.finished()

        async def aclose(self) -> None:
            await sink.aclose()

    return Timed()


class NaiveEmailSink:
    """The baseline: one new SMTP connection per email (``aiosmtplib.send`` each time)."""

    def __init__(self, host: str, port: int, cafile: str | None) -> None:
        import ssl

        self.host, self.port = host, port
        # Like the EmailSink's starttls mode: TLS required and verified, when the sink has it.
        self.tls = ssl.create_default_context(cafile=cafile) if cafile else None

    async def deliver(self, intent: Any) -> None:
        import aiosmtplib

        from worker.sinks.email import build_message

        msg, sender, recipients = build_message(intent, "bench@example.com")
        await aiosmtplib.send(
            msg,
            hostname=self.host,
            port=self.port,
            sender=sender,
            recipients=recipients,
            start_tls=self.tls is not None,
            tls_context=self.tls,
        )

    async def aclose(self) -> None:
        pass


# --- the floor: a bare SKIP LOCKED claim-and-delete loop ---------------------------------


class BareWorker:
    def __init__(self, cfg: dict[str, Any], rec: Recorder) -> None:
        self.cfg, self.rec = cfg, rec
        self._stop = anyio.Event()

    async def setup(self) -> None:
        import asyncpg

        from bench.sql import query
        from worker.store.sqlfiles import Names

        self.conn = await asyncpg.connect(
            self.cfg["dsn"], server_settings={"application_name": f"bare {self.cfg['tag']}"}
        )
        self.sql = query("bare_claim_delete", Names(self.cfg["schema"], self.cfg["channel"]))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        while not self._stop.is_set():
            rows = await self.conn.fetch(self.sql, self.cfg["batch_size"])
            for row in rows:
                self.rec.started(key_of(orjson.loads(row["payload"]), -1))
                self.rec.finished()
            if not rows:
                with anyio.move_on_after(0.005):
                    await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def info(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        await self.conn.close()


# --- pgqueuer ----------------------------------------------------------------------------


def pgqueuer_queries(driver: Any, schema: str, channel: str) -> Any:
    """pgqueuer's Queries bound to one schema and channel (shared with the producers)."""
    from pgqueuer import Queries
    from pgqueuer.adapters.persistence.qb import (
        QueryBuilderEnvironment,
        QueryQueueBuilder,
        QuerySchedulerBuilder,
    )
    from pgqueuer.domain.settings import DBSettings
    from pgqueuer.domain.types import Channel

    settings = DBSettings(db_schema=schema, channel=Channel(channel))
    return Queries(
        driver,
        qbe=QueryBuilderEnvironment(settings),
        qbq=QueryQueueBuilder(settings),
        qbs=QuerySchedulerBuilder(settings),
    )


class PgqueuerWorker:
    """Its documented set-up for throughput: one dedicated asyncpg connection for the
    QueueManager, durable tables, ``batch_size`` tuned (swept by the scenario)."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder) -> None:
        self.cfg, self.rec = cfg, rec

    async def setup(self) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, QueueManager
        from pgqueuer.domain.types import Channel

        cfg = self.cfg
        self.conn = await asyncpg.connect(
            cfg["dsn"], server_settings={"application_name": f"pgqueuer {cfg['tag']}"}
        )
        queries = pgqueuer_queries(AsyncpgDriver(self.conn), cfg["schema"], cfg["channel"])
        self.qm = QueueManager(queries, channel=Channel(cfg["channel"]))
        rec = self.rec

        @self.qm.entrypoint("bench")
        async def bench(job: Any) -> None:
            rec.started(key_of(orjson.loads(job.payload), -1))
            rec.finished()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            # Listening once its LISTEN is registered on the connection; asyncpg has no
            # public flag or event for that.
            with anyio.fail_after(10):
                while not self.conn._listeners:  # type: ignore[attr-defined]  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            task_status.started()

    async def _run(self) -> None:
        await self.qm.run(
            batch_size=self.cfg["batch_size"],
            dequeue_timeout=timedelta(seconds=self.cfg["poll_interval"]),
        )

    def stop(self) -> None:
        self.qm.shutdown.set()

    def info(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        await self.conn.close()


# --- procrastinate -----------------------------------------------------------------------


def procrastinate_app(dsn: str, schema: str, tag: str, pool_size: int) -> Any:
    import procrastinate

    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"options": f"-c search_path={schema}", "application_name": tag},
        )
    )


class ProcrastinateWorker:
    """Async tasks with ``concurrency`` (swept), LISTEN/NOTIFY on, default polling."""

    def __init__(self, cfg: dict[str, Any], rec: Recorder) -> None:
        self.cfg, self.rec = cfg, rec
        self._scope = anyio.CancelScope()

    async def setup(self) -> None:
        cfg = self.cfg
        self.app = procrastinate_app(
            cfg["dsn"], cfg["schema"], f"procrastinate {cfg['tag']}", cfg["concurrency"] + 2
        )
        rec = self.rec

        @self.app.task(name="bench")
        async def bench(k: int) -> None:
            rec.started(k)
            rec.finished()

        await self.app.open_async()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            await anyio.sleep(0.2)  # no public "listening" signal; the parent warms up too
            task_status.started()

    async def _run(self) -> None:
        with self._scope:
            await self.app.run_worker_async(
                concurrency=self.cfg["concurrency"],
                fetch_job_polling_interval=self.cfg["poll_interval"],
                listen_notify=True,
                install_signal_handlers=False,
                delete_jobs="never",
                wait=True,
            )

    def stop(self) -> None:
        self._scope.cancel()

    def info(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        await self.app.close_async()


KINDS: dict[str, Callable[[dict[str, Any], Recorder], Worker]] = {
    "relay": RelayWorker,
    "bare": BareWorker,
    "pgqueuer": PgqueuerWorker,
    "procrastinate": ProcrastinateWorker,
}


# --- the control loop --------------------------------------------------------------------


def emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def main(cfg: dict[str, Any]) -> None:
    rec = Recorder(per_intent=cfg.get("per_intent", True))
    worker = KINDS[cfg["kind"]](cfg, rec)
    await worker.setup()
    commands = anyio.wrap_file(sys.stdin)
    emit({"event": "ready"})
    try:
        line = await commands.readline()
        if orjson.loads(line)["cmd"] != "go":
            raise RuntimeError(f"expected go, got {line!r}")
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            emit({"event": "running", "t0": t0, "t": time.monotonic()})
            async for line in commands:
                cmd = orjson.loads(line)
                if cmd["cmd"] == "wait":
                    at = await rec.wait_for(cmd["count"], cmd["timeout"])
                    emit({"event": "handled", "count": rec.done, "t": at})
                elif cmd["cmd"] == "info":
                    emit({"event": "info", "handled": rec.done, **worker.info()})
                elif cmd["cmd"] == "stop":
                    break
            worker.stop()
    finally:
        with anyio.CancelScope(shield=True):
            await worker.close()
    emit({"event": "stopped", "starts": rec.starts})


if __name__ == "__main__":
    from worker.eventloop import backend_options

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # Every system on the loop `outbox-worker run` uses (uvloop where installed), so the
    # alternatives get the same advantage; a --baseline checkout runs its own child.
    anyio.run(main, orjson.loads(sys.argv[1]), backend_options=backend_options())
