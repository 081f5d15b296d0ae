"""The relay: its parts wired together, and their lifecycle (start, two-phase stop). The
data flow is drawn in worker/relay/__init__.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import asyncpg

from worker.intent import Intent
from worker.observe.loopwatch import LoopWatch
from worker.observe.stats import Stats
from worker.relay.claimer import Claimer
from worker.relay.delivery import RetryPolicy
from worker.relay.dispatch import Dispatcher
from worker.relay.inflight import InFlight
from worker.relay.leases import Leases
from worker.relay.listener import Listener
from worker.relay.retention import Retention
from worker.relay.wakeup import Wakeup
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.store.connection import DedicatedConnection
from worker.store.queries import Store
from worker.store.sqlfiles import Names

if TYPE_CHECKING:  # imported only when tracing is on
    from worker.observe.otel import DeliveryTracer

log = logging.getLogger("outbox.relay")

# After the shutdown's delivery phase, how long we keep trying to record outcomes and
# release rows. Past it, unrecorded rows are rescued by lease expiry (redelivered).
_FLUSH_TIMEOUT = 10.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Relay:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        dsn: str,
        settings: Settings,
        sinks: Mapping[str, Sink],
        stats: Stats | None = None,
        worker_id: str | None = None,
        tracer: DeliveryTracer | None = None,  # worker.observe.tracing.from_env(); None: no spans
        store: Store | None = None,  # default: the settings' schema and channel
    ) -> None:
        self.settings = settings
        self.store = store or Store(Names(settings.schema, settings.channel))
        self.worker_id = worker_id or new_worker_id()
        self.stats = stats or Stats(settings.concurrency)
        self.wakeup = Wakeup()
        self._stopping = False
        self._hard_stopped = False
        self._delivery_scope: anyio.CancelScope | None = None
        name = f"outbox-worker {self.worker_id}"
        skip_dead = settings.ordering_on_dead == "continue"
        # Every statement of the claim loop wants rows in index order (claim, hold_backlog,
        # rescue: ORDER BY ... LIMIT on a partial index). Without statistics (a new or
        # freshly filled table, before autovacuum's ANALYZE) the planner was seen to sort
        # every pending row instead, 3-20x slower per claim: tell it not to.
        self._claim_conn = DedicatedConnection(
            dsn, f"{name} claims", settings={"enable_sort": "off"}, pooled=settings.pooled
        )
        # The database is back (the writer retries outcomes through an outage): wake the
        # claim loop from its backoff rather than let it sleep on.
        self._write_conn = DedicatedConnection(
            dsn, f"{name} outcomes", pooled=settings.pooled, on_reconnect=self.wakeup.set
        )
        self.inflight = InFlight(
            self._write_conn,
            self.store,
            self.worker_id,
            settings=settings,
            stats=self.stats,
            wakeup=self.wakeup,
        )
        self.leases = Leases(
            pool,
            self.store,
            self.worker_id,
            self.inflight,
            lease=settings.lease,
            max_attempts=settings.max_attempts,
            skip_dead=skip_dead,
            stats=self.stats,
        )
        self.retention = Retention(
            pool,
            self.store,
            self.stats,
            retain_sent=settings.retain_sent,
            retain_dead=settings.retain_dead,
            keep_halting=not skip_dead,
        )
        self._dispatcher = Dispatcher(
            concurrency=settings.concurrency,
            sinks=sinks,
            policy=RetryPolicy(settings.max_attempts, settings.backoff_base, settings.backoff_max),
            timeout=settings.delivery_timeout,
            stats=self.stats,
            on_outcome=self.inflight.delivered,
            tracer=tracer,
        )
        self.listener = (
            Listener(
                settings.listen_dsn or dsn,
                settings.channel,
                self.wakeup,
                self.stats,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                application_name=f"outbox-worker listener {self.worker_id}",
            )
            if settings.listen
            else None
        )
        self.loopwatch = (
            LoopWatch(settings.loop_block_warning, self.stats, self._dispatcher.running)
            if settings.loop_block_warning
            else None
        )
        limited = {k: s.saturated for k, s in sinks.items() if hasattr(s, "saturated")}
        self._claimer = Claimer(
            conn=self._claim_conn,
            store=self.store,
            settings=settings,
            worker_id=self.worker_id,
            wakeup=self.wakeup,
            stats=self.stats,
            dispatcher=self._dispatcher,
            rows=self.inflight,
            leases=self.leases,
            listener=self.listener,
            # Kinds whose sink is at its --limits: claiming them now would only defer them.
            saturated_kinds=lambda: [kind for kind, full in limited.items() if full()],
        )

    @property
    def in_flight(self) -> Mapping[int, Intent]:
        """Rows this worker holds a lease on, from claim until their outcome is recorded."""
        return self.inflight.held

    @property
    def idle_declared(self) -> bool:
        return self._claimer.idle_declared

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Phase one: stop claiming; in-flight deliveries get ``grace`` seconds to finish."""
        if not self._stopping:
            log.info(
                "stopping: no new claims; waiting up to %gs for %d in-flight deliveries",
                self.settings.grace,
                len(self.in_flight),
            )
            # The grace period runs from now, whatever the claim loop is doing.
            if self._delivery_scope is not None:
                self._delivery_scope.deadline = anyio.current_time() + self.settings.grace
        self._stopping = True
        self._claimer.stop()

    def hard_stop(self) -> None:
        """Phase two now: cancel in-flight deliveries and release their rows."""
        self.stop()
        self._hard_stopped = True
        if self._delivery_scope is not None:
            self._delivery_scope.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        log.info(
            "worker %s: %d delivery slots, schema %s, %s",
            self.worker_id,
            self.settings.concurrency,
            self.settings.schema,
            "LISTEN + poll" if self.listener else "poll only",
        )
        try:
            async with anyio.create_task_group() as services:
                if self.listener is not None:
                    services.start_soon(self.listener.run)
                if self.settings.heartbeat:
                    services.start_soon(self.leases.heartbeat)
                if self.loopwatch is not None:
                    services.start_soon(self.loopwatch.run)
                services.start_soon(self.retention.run)
                await self._pipeline(task_status)
                await self.inflight.release_unfinished(_FLUSH_TIMEOUT)
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._claim_conn.close()
                await self._write_conn.close()
        log.info("stopped")

    async def _pipeline(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Claim and deliver until stopped; then let deliveries finish within the grace
        period and flush their outcomes."""
        with anyio.move_on_after(float("inf")) as flush_scope:
            async with anyio.create_task_group() as writer_group:
                writer_group.start_soon(self.inflight.run)
                with anyio.CancelScope() as self._delivery_scope:
                    if self._stopping:  # stop() came before run()
                        self._delivery_scope.deadline = anyio.current_time() + self.settings.grace
                    async with anyio.create_task_group() as pipeline:
                        pipeline.start_soon(self._dispatcher.run)
                        task_status.started()
                        await self._claimer.run()
                        self._dispatcher.close()  # busy slots finish; idle ones exit
                        self._delivery_scope.deadline = min(
                            self._delivery_scope.deadline,
                            anyio.current_time() + self.settings.grace,
                        )
                if self._delivery_scope.cancelled_caught:
                    log.warning(
                        "%s: cancelled %d deliveries",
                        "second stop request" if self._hard_stopped else "grace period over",
                        len(self.in_flight),
                    )
                self.inflight.close()
                flush_scope.deadline = anyio.current_time() + _FLUSH_TIMEOUT
