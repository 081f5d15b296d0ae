"""`outbox-worker demo`: the whole relay at work, with one command after ``pip install``.

A database (embedded unless ``--dsn`` is given), an SMTP server in this process that catches
the mail, a producer committing a stream of sample intents, and the worker with its
dashboard. Some intents fail on purpose: the SMTP server greylists a few messages (retried)
and refuses one mailbox (dead), a handler of the demo's own kind (``order_created``, as your
code would register with ``--handlers``) is flaky, and a few payloads are invalid.
Nothing leaves this machine: the mail goes to 127.0.0.1, the handler calls nobody.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.cli.app import run_worker
from worker.errors import ConfigError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.relay.core import Relay
from worker.settings import Settings, default_channel
from worker.sinks.handlers import Handlers
from worker.store.db import connect
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names, quote_ident

log = logging.getLogger("outbox.demo")

DEMO_SCHEMA = "outbox_demo"
BOUNCING_DOMAIN = "bounce.example.com"  # the catcher refuses these recipients: dead

handlers = Handlers()  # passed to the worker as --handlers worker.cli.demo:handlers


@handlers.register("order_created")
async def tell_the_warehouse(intent: Intent) -> None:
    """Pretends to call a partner's API: takes 20-400 ms and fails now and then."""
    await anyio.sleep(random.uniform(0.02, 0.4))
    if intent.payload.get("endpoint") == "down" or random.random() < 0.04:
        raise TransientError(f"503 Service Unavailable from {intent.payload.get('url')} (demo)")


class MailCatcher:
    """An SMTP server on 127.0.0.1 that keeps count of the mail instead of sending it."""

    def __init__(self, greylist: float = 0.03) -> None:
        self.caught = 0
        self.refused = 0
        self.port = 0
        self._greylist = greylist
        self._server: asyncio.AbstractServer | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address.lower().endswith("@" + BOUNCING_DOMAIN):
            self.refused += 1
            return f"550 5.1.1 <{address}>: mailbox unavailable (demo)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(random.uniform(0.01, 0.25))  # a real server takes a moment
        if random.random() < self._greylist:
            self.refused += 1
            return "451 4.7.1 greylisted, try again later (demo)"
        self.caught += 1
        return "250 2.0.0 caught by the demo"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}?tls=none"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # aiosmtpd's notes on TLS-less servers
                return SMTP(self, hostname="demo.localhost", ident="outbox-worker demo")

        self._server = await loop.create_server(protocol, host="127.0.0.1", port=0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


@asynccontextmanager
async def mail_catcher() -> AsyncIterator[MailCatcher]:
    catcher = MailCatcher()
    await catcher.start()
    try:
        yield catcher
    finally:
        with anyio.CancelScope(shield=True):
            await catcher.stop()


@dataclass(frozen=True)
class DemoOptions:
    concurrency: int = 8
    rate: float = 20.0  # intents per second on average
    duration: float | None = None  # stop by itself after this many seconds
    dashboard: bool = True
    schema: str = DEMO_SCHEMA


def check_schema(schema: str) -> str:
    # The demo empties its schema at start and marks whatever it finds there as sent to a
    # fake server: never let it near a real one.
    if not schema.startswith(DEMO_SCHEMA):
        raise ConfigError(
            f"the demo empties its schema and fakes every delivery: use a schema whose name "
            f"starts with {DEMO_SCHEMA!r}, not {schema!r}"
        )
    return schema


def sample_intent(n: int, rng: random.Random) -> tuple[str, dict[str, Any], datetime | None]:
    """The n-th sample: mostly good mail and partner calls, a few that fail on purpose."""
    roll = rng.random()
    later = None
    if rng.random() < 0.03:  # scheduled: shows up as "scheduled" until due
        later = datetime.now(UTC) + timedelta(seconds=rng.uniform(5, 40))
    if roll < 0.68:
        return (
            "email",
            {
                "to": f"customer{n % 997}@example.com",
                "subject": f"Your order #{10_000 + n} has shipped",
                "text": f"Hello! Order #{10_000 + n} is on its way.\n\n-- the demo shop",
            },
            later,
        )
    if roll < 0.69:  # a mailbox that does not exist: 550, dead at once
        return (
            "email",
            {"to": f"nobody{n}@{BOUNCING_DOMAIN}", "subject": "Welcome", "text": "Hi!"},
            later,
        )
    if roll < 0.693:  # a bad payload (no subject): refused before any I/O, dead
        return "email", {"to": "someone@example.com", "text": "no subject"}, later
    endpoint = "down" if roll > 0.995 else "ok"  # always 503: retried until attempts run out
    return (
        "order_created",
        {"url": f"https://warehouse.example.com/orders/{n}", "endpoint": endpoint, "n": n},
        later,
    )


async def produce(dsn: str, schema: str, rate: float, relay: list[Relay], count: list[int]) -> None:
    """Commit samples in small transactions at a rate that swells and ebbs, with a burst
    now and then, until the relay stops."""
    rng = random.Random()
    conn = await connect(dsn, server_settings={"application_name": "outbox-worker demo producer"})
    try:
        started = anyio.current_time()
        carry = 0.0
        while not (relay and relay[0].stopping):
            elapsed = anyio.current_time() - started
            wave = 1 + 0.6 * math.sin(2 * math.pi * elapsed / 40)
            burst = 5.0 if elapsed % 45 < 2 else 1.0
            carry += rate * wave * burst * 0.1
            batch, carry = int(carry), carry - int(carry)
            if batch:
                async with conn.transaction():
                    for _ in range(batch):
                        kind, payload, run_at = sample_intent(count[0], rng)
                        await enqueue(conn, kind, payload, run_at=run_at, schema=schema)
                        count[0] += 1
            await anyio.sleep(0.1)
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def reset_schema(dsn: str, schema: str) -> None:
    conn = await connect(dsn)
    try:
        await migrate(conn, Names(schema, default_channel(schema)))
        await conn.execute(f"TRUNCATE {quote_ident(schema)}.intent RESTART IDENTITY")
    finally:
        await conn.close()


async def _stop_after(seconds: float, relay: list[Relay]) -> None:
    await anyio.sleep(seconds)
    if relay:
        relay[0].stop()


@dataclass(frozen=True)
class DemoResult:
    enqueued: int
    caught: int  # mails the in-process SMTP server accepted
    refused: int  # replies it refused on purpose (greylisting, unknown mailbox)


async def run_demo(
    dsn: str, options: DemoOptions, relay_holder: list[Relay] | None = None
) -> DemoResult:
    """Run until ``q``/Ctrl-C/SIGTERM (or ``options.duration``). The relay, once started, is
    appended to ``relay_holder`` if given (``bench.screenshots`` draws its dashboard)."""
    schema = check_schema(options.schema)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    await reset_schema(dsn, schema)
    relay: list[Relay] = [] if relay_holder is None else relay_holder
    enqueued = [0]
    async with mail_catcher() as catcher:
        settings = Settings(
            dsn=dsn,
            schema=schema,
            channel=default_channel(schema),
            concurrency=options.concurrency,
            max_attempts=4,
            backoff_base=1.0,
            backoff_max=8.0,
            handlers="worker.cli.demo:handlers",
            # The email kind's options (worker/sinks/email/spec.py): mail to the catcher.
            sink_options={"smtp_url": catcher.url, "mail_from": "shop@demo.example.com"},
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, dsn, schema, options.rate, relay, enqueued)
            if options.duration is not None:
                tg.start_soon(_stop_after, options.duration, relay)
            try:
                await run_worker(
                    settings,
                    dsn,
                    relay_holder=relay,
                    dashboard=options.dashboard,
                    title="outbox-worker demo",
                )
            finally:
                tg.cancel_scope.cancel()
    return DemoResult(enqueued[0], catcher.caught, catcher.refused)
