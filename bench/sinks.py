"""``python -m bench.sinks``: throughput of the webhook, rabbitmq, nats, sidekiq, celery, sqs
and kafka sinks against the local servers, alone and through the relay (and of a no-op sink,
as the relay's baseline).

    python -m bench.sinks                            # every sink, 5,000 intents, 3 runs
    python -m bench.sinks --sinks nats --intents 20000 --concurrency 8,64
    python -m bench.sinks --intents 200 --runs 1     # a quick check that it all works
    python -m bench.sinks --sinks nats --concurrency 64 --modes sink,relay,limited
    python -m bench.sinks --sinks kafka --modes sink,relay,noop

Two modes per sink and concurrency, and more on request:
* ``sink``: N deliveries straight into the sink from C tasks (no database): what the client
  library and the server can do;
* ``relay``: N intents committed in one INSERT, drained by a relay with C delivery slots;
  the clock runs from the commit to the last ``sent`` outcome recorded;
* ``limited``: as ``relay``, with the sink under ``--limits KIND:concurrency=C`` (C the
  relay's slots: a limit that changes nothing, so this should match ``relay``);
* ``noop``: as ``relay``, the same intents into a no-op sink: the relay's own ceiling in
  that round (kafka runs it by default: its drain should stay near it).

The webhook receiver runs in a child process (its CPU is not the relay's); RabbitMQ is
127.0.0.1:5672 guest/guest, NATS 127.0.0.1:4222, Redis 127.0.0.1:6379 (--rabbitmq-url,
--nats-url, --redis-url); sidekiq pushes to a queue of the run's own on Redis; celery-amqp and
celery-redis push to a queue on RabbitMQ and on Redis (bench/celery_targets.py); sqs and
sqs-fifo send to a standard and a FIFO queue on moto's SQS server, which the run starts
(bench/sqs_targets.py); kafka produces to a Tansu broker the run starts (bench/kafka_target.py).
Each figure
is the median of --runs runs, with min-max; the modes alternate within each round, and
"× sink alone" is the relay's rate over the sink's in the same round (concurrency 8, 32, 64
by default). Every run checks that the server got all N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import orjson
from rich.console import Console
from rich.table import Table

from worker.cli.embedded import LOCAL_DSN
from worker.eventloop import backend_options
from worker.intent import Intent
from worker.relay.core import Relay
from worker.settings import Settings, default_channel
from worker.sinks.base import Sink
from worker.sinks.limits import apply_limits, parse_limits
from worker.store.db import create_pool
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names

SINKS = (
    "noop", "webhook", "rabbitmq", "nats", "sidekiq", "celery-amqp", "celery-redis", "sqs",
    "sqs-fifo", "kafka",
)  # fmt: skip
# Kinds that also run the "noop" mode in each round: the relay's drain next to its no-op drain.
WITH_NOOP = ("kafka",)
# For comparison: Celery's own client (--sinks kombu-amqp), aiobotocore alone (sqs-*client).
ON_REQUEST = ("kombu-amqp", "sqs-client", "sqs-fifo-client")
CONCURRENCY = (8, 32, 64)
URLS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
}


# --- the webhook receiver (child process) -----------------------------------------------------


async def _serve_webhook() -> None:
    """Answer 200 to every POST and count them; ``GET /count`` tells. Ends at stdin EOF."""
    from aiohttp import web

    received = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.Response(text="ok")

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(received))

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    await runner.cleanup()


@contextlib.contextmanager
def webhook_receiver() -> Any:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sinks", "--serve-webhook"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- one target per sink: how to build it, what to send, how to count what arrived ----------


@dataclass
class Target:
    kind: str
    payload: dict[str, Any]
    make_sink: Callable[[int, str], Sink]  # (concurrency, id prefix) -> sink
    received: Callable[[], Awaitable[int]]  # what the server holds now
    reset: Callable[[], Awaitable[None]]
    version: str = ""
    # Made ready before the clock starts, as a worker's sink is long before its first intent.
    warm: Callable[[Sink], Awaitable[None]] | None = None


@contextlib.asynccontextmanager
async def webhook_target() -> AsyncIterator[Target]:
    import aiohttp

    from worker.sinks.webhook.sink import WebhookSink

    with webhook_receiver() as base:
        async with aiohttp.ClientSession() as client:
            offset = 0

            async def total() -> int:
                async with client.get(f"{base}/count") as response:
                    return int(await response.text())

            async def received() -> int:
                return await total() - offset

            async def reset() -> None:
                nonlocal offset
                offset = await total()

            yield Target(
                "webhook",
                {"url": f"{base}/hook", "body": {"order": 42, "total": "19.99"}},
                lambda c, prefix: WebhookSink(
                    # The receiver is on 127.0.0.1: refused unless named (or private allowed).
                    secret="bench-secret",
                    allow_hosts=("127.0.0.1",),
                    max_connections=c,
                    id_prefix=prefix,
                ),
                received,
                reset,
                f"aiohttp {metadata.version('aiohttp')}",
            )


@contextlib.asynccontextmanager
async def rabbitmq_target(url: str) -> AsyncIterator[Target]:
    import aio_pika

    from worker.sinks.rabbitmq.sink import RabbitMQSink

    name = f"outbox_bench_{secrets.token_hex(4)}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT)
        queue = await channel.declare_queue(name)
        await queue.bind(exchange, "bench")

        async def received() -> int:
            declared = await channel.declare_queue(name, passive=True)
            return int(declared.declaration_result.message_count or 0)

        async def reset() -> None:
            await queue.purge()

        try:
            yield Target(
                "rabbitmq",
                {"exchange": name, "routing_key": "bench", "body": {"order": 42}},
                lambda c, prefix: RabbitMQSink(url, id_prefix=prefix),
                received,
                reset,
                f"aio-pika {metadata.version('aio-pika')}, RabbitMQ {_broker_version(connection)}",
            )
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def nats_target(url: str) -> AsyncIterator[Target]:
    import nats

    from worker.sinks.nats.sink import NatsSink

    name = f"OUTBOX_BENCH_{secrets.token_hex(4)}"
    client = await nats.connect(url)
    js = client.jetstream()
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    try:

        async def received() -> int:
            return int((await js.stream_info(name)).state.messages)

        async def reset() -> None:
            await js.purge_stream(name)

        yield Target(
            "nats",
            {"subject": f"{name.lower()}.orders", "body": {"order": 42}},
            lambda c, prefix: NatsSink(url, id_prefix=prefix),
            received,
            reset,
            f"nats-py {metadata.version('nats-py')}, nats-server {_version(client)}",
        )
    finally:
        await js.delete_stream(name)
        await client.close()


@contextlib.asynccontextmanager
async def sidekiq_target(url: str) -> AsyncIterator[Target]:
    import redis.asyncio as redis

    from worker.sinks.sidekiq.sink import SidekiqSink

    queue = f"outbox_bench_{secrets.token_hex(4)}"
    client = redis.Redis.from_url(url)
    try:

        async def received() -> int:
            return int(await client.llen(f"queue:{queue}"))

        async def reset() -> None:
            await client.delete(f"queue:{queue}")

        server = (await client.info("server"))["redis_version"]
        yield Target(
            "sidekiq",
            {"class": "BenchJob", "args": [42], "queue": queue},
            lambda c, prefix: SidekiqSink(url, id_prefix=prefix),
            received,
            reset,
            f"redis-py {metadata.version('redis')}, Redis {server}",
        )
    finally:
        await client.delete(f"queue:{queue}")
        await client.srem("queues", queue)
        await client.aclose()


def _broker_version(connection: Any) -> str:
    properties = connection.transport.connection.server_properties if connection.transport else {}
    version = properties.get("version", "?")
    return version.decode() if isinstance(version, bytes) else str(version)


def _version(client: Any) -> str:
    v = client.connected_server_version
    return f"{v.major}.{v.minor}.{v.patch}"


@contextlib.asynccontextmanager
async def noop_target() -> AsyncIterator[Target]:
    """A sink that does nothing: what the relay itself costs, as a baseline."""
    from worker.sinks.handlers import HandlerSink

    delivered = 0

    async def noop(intent: Intent) -> None:
        nonlocal delivered
        delivered += 1

    async def received() -> int:
        return delivered

    async def reset() -> None:
        nonlocal delivered
        delivered = 0

    yield Target("noop", {}, lambda c, prefix: HandlerSink(noop), received, reset, "")


def noop_sink() -> Sink:
    from worker.sinks.handlers import HandlerSink

    async def noop(intent: Intent) -> None:
        pass

    return HandlerSink(noop)


# --- the two modes ---------------------------------------------------------------------------


def _intent(n: int, kind: str, payload: dict[str, Any]) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind=kind, payload=payload, attempts=1, max_attempts=1, created_at=now, run_at=now
    )


async def sink_only(target: Target, sink: Sink, intents: int, concurrency: int) -> float:
    """Seconds to push ``intents`` deliveries through ``sink`` from ``concurrency`` tasks."""
    todo = iter(range(1, intents + 1))

    async def worker() -> None:
        for n in todo:
            await sink.deliver(_intent(n, target.kind, target.payload))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return time.perf_counter() - started


async def through_relay(
    target: Target, sink: Sink, intents: int, concurrency: int, dsn: str
) -> float:
    """Seconds from the commit of ``intents`` rows to the last outcome recorded."""
    schema = f"outbox_bench_{secrets.token_hex(4)}"
    names = Names(schema, default_channel(schema))
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, names)
        settings = replace(
            Settings(),
            dsn=dsn,
            schema=schema,
            channel=names.channel,
            concurrency=concurrency,
            poll_interval=1.0,
            max_attempts=1,  # a failure is dead, and then the count below is short
        )
        pool = await create_pool(dsn, max_size=5, application_name="bench.sinks")
        try:
            relay = Relay(
                pool=pool,
                dsn=dsn,
                settings=settings,
                sinks={target.kind: sink},
            )
            async with anyio.create_task_group() as tg:
                await tg.start(relay.run)
                await _wait(lambda: relay.stats.listener_connected)
                await conn.execute(
                    f'INSERT INTO "{schema}".intent (kind, payload) '
                    "SELECT $1, $2::jsonb FROM generate_series(1, $3)",
                    target.kind,
                    orjson.dumps(target.payload).decode(),
                    intents,
                )
                started = time.perf_counter()
                await _wait(
                    lambda: (
                        relay.stats.sent[target.kind] + relay.stats.dead[target.kind] >= intents
                    ),
                    interval=0.002,
                )
                elapsed = time.perf_counter() - started
                relay.stop()
            dead = relay.stats.dead[target.kind]
            if dead:
                raise RuntimeError(f"{target.kind}: {dead} intents dead during the bench")
            return elapsed
        finally:
            await pool.close()
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _wait(
    predicate: Callable[[], bool], interval: float = 0.01, timeout: float = 600
) -> None:
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(interval)


# --- driver ----------------------------------------------------------------------------------


async def once(target: Target, mode: str, concurrency: int, intents: int, dsn: str) -> float:
    """Intents/s of one run of ``mode``; fails unless the server got all of them."""
    await target.reset()
    # A fresh id prefix per run: JetStream would drop a repeated Nats-Msg-Id as a duplicate.
    sink = target.make_sink(concurrency, f"{mode}{concurrency}-{secrets.token_hex(4)}-")
    if mode == "noop":  # the same intents into a sink that does nothing
        await sink.aclose()
        sink = noop_sink()
    elif target.warm is not None:
        await target.warm(sink)
    try:
        if mode == "sink":
            elapsed = await sink_only(target, sink, intents, concurrency)
        else:
            if mode == "limited":  # as `outbox-worker run --limits` wraps it
                limits = parse_limits(f"{target.kind}:concurrency={concurrency}")
                sink = apply_limits({target.kind: sink}, limits)[target.kind]
            elapsed = await through_relay(target, sink, intents, concurrency, dsn)
    finally:
        await sink.aclose()
    got = intents if mode == "noop" else await target.received()
    if got < intents:
        raise RuntimeError(f"{target.kind} {mode}: the server holds {got} of {intents}")
    return intents / elapsed


Record = Callable[[str, int, dict[str, float]], None]


async def measure_rounds(
    kinds: list[str],
    concurrencies: list[int],
    modes: list[str],
    intents: int,
    runs: int,
    dsn: str,
    urls: dict[str, str],
    record: Record,
    limited: Collection[str] = (),
    with_noop: Collection[str] = WITH_NOOP,
) -> list[str]:
    """Per sink and concurrency, ``runs`` rounds of every mode in turn (each round starting
    with the next mode), so that a ratio of modes is taken within a round; ``record(kind,
    concurrency, {mode: intents/s})`` after each round. ``urls`` holds "rabbitmq", "nats" and
    "redis"; the kinds in ``limited`` also run the "limited" mode, those in ``with_noop`` the
    "noop" mode. Returns the client/server versions."""
    from bench import celery_targets, kafka_target, sqs_targets

    factories: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[Target]]] = {
        "noop": noop_target,
        "webhook": webhook_target,
        "rabbitmq": lambda: rabbitmq_target(urls["rabbitmq"]),
        "nats": lambda: nats_target(urls["nats"]),
        "sidekiq": lambda: sidekiq_target(urls["redis"]),
        "celery-amqp": lambda: celery_targets.celery_amqp_target(urls["rabbitmq"]),
        "celery-redis": lambda: celery_targets.celery_redis_target(urls["redis"]),
        "kombu-amqp": lambda: celery_targets.kombu_amqp_target(urls["rabbitmq"]),
        "sqs": lambda: sqs_targets.sqs_target("sqs"),
        "sqs-fifo": lambda: sqs_targets.sqs_target("sqs-fifo"),
        "sqs-client": lambda: sqs_targets.sqs_target("sqs-client"),
        "sqs-fifo-client": lambda: sqs_targets.sqs_target("sqs-fifo-client"),
        "kafka": kafka_target.kafka_target,
    }
    versions = []
    for kind in kinds:
        async with factories[kind]() as target:
            if target.version and target.version not in versions:
                versions.append(target.version)
            extra = [m for m, kinds in (("limited", limited), ("noop", with_noop)) if kind in kinds]
            kind_modes = [*modes, *(m for m in extra if m not in modes)]
            for concurrency in concurrencies:
                for run in range(runs):
                    # Each round starts with the next mode, so no mode always runs first.
                    turn = run % len(kind_modes)
                    order = kind_modes[turn:] + kind_modes[:turn]
                    rates = {m: await once(target, m, concurrency, intents, dsn) for m in order}
                    record(kind, concurrency, rates)
    return versions


async def unreachable(urls: dict[str, str]) -> str | None:
    """Why the brokers cannot be used (one line), or None when both accept connections."""
    for name, url in urls.items():
        parts = urlsplit(url)
        try:
            with anyio.fail_after(3):
                stream = await anyio.connect_tcp(parts.hostname or "127.0.0.1", parts.port or 0)
            await stream.aclose()
        except (OSError, TimeoutError) as exc:
            return f"{name} at {parts.hostname}:{parts.port} unreachable ({exc})"
    return None


@dataclass
class Row:
    sink: str
    mode: str
    concurrency: int
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # through the relay / alone, per round
    vs_relay: list[float] = field(default_factory=list)  # limited / relay, per round
    vs_noop: list[float] = field(default_factory=list)  # relay / the no-op relay, per round

    def summary(self) -> dict[str, float]:
        out = {
            "median": statistics.median(self.rates),
            "min": min(self.rates),
            "max": max(self.rates),
        }
        if self.ratios:
            out["vs_sink_alone"] = statistics.median(self.ratios)
        if self.vs_relay:
            out["vs_relay"] = statistics.median(self.vs_relay)
        if self.vs_noop:
            out["vs_noop_relay"] = statistics.median(self.vs_noop)
        return out


MODE_LABELS = {
    "sink": "sink alone",
    "relay": "through relay",
    "limited": "through relay, --limits KIND:concurrency=C",
    "noop": "through relay, a no-op sink instead",
}


def _ratio(values: list[float]) -> str:
    if not values:
        return ""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(rows: list[Row], intents: int, runs: int, versions: list[str]) -> Table:
    out = Table(
        title=f"Sink throughput, intents/s: median of {runs} runs (min-max), {intents:,} each",
        caption="; ".join(versions),
    )
    columns = (
        "sink", "mode", "concurrency", "intents/s", "min-max", "× sink alone (min-max)",
        "× relay without --limits (min-max)", "× no-op relay (min-max)",
    )  # fmt: skip
    for column in columns:
        out.add_column(column, justify="left" if column in ("sink", "mode") else "right")
    for row in rows:
        s = row.summary()
        out.add_row(
            row.sink,
            MODE_LABELS[row.mode],
            str(row.concurrency),
            f"{s['median']:,.0f}",
            f"{s['min']:,.0f}-{s['max']:,.0f}",
            _ratio(row.ratios),
            _ratio(row.vs_relay),
            _ratio(row.vs_noop),
        )
    return out


async def run(args: argparse.Namespace) -> list[Row]:
    console = Console()
    rows: dict[tuple[str, int, str], Row] = {}

    def record(kind: str, concurrency: int, rates: dict[str, float]) -> None:
        for mode, rate in rates.items():
            row = rows.setdefault((kind, concurrency, mode), Row(kind, mode, concurrency))
            row.rates.append(rate)
            if mode not in ("sink", "noop") and "sink" in rates:
                row.ratios.append(rate / rates["sink"])
            if mode == "limited" and "relay" in rates:
                row.vs_relay.append(rate / rates["relay"])
            if mode == "relay" and "noop" in rates:
                row.vs_noop.append(rate / rates["noop"])
            console.log(f"{kind} {mode} c={concurrency}: {rate:,.0f}/s")

    urls = {"rabbitmq": args.rabbitmq_url, "nats": args.nats_url, "redis": args.redis_url}
    versions = await measure_rounds(
        args.sinks, args.concurrency, args.modes, args.intents, args.runs, args.dsn, urls, record
    )
    console.print(table(list(rows.values()), args.intents, args.runs, versions))
    if args.json:
        document = {
            "intents": args.intents,
            "runs": args.runs,
            "versions": versions,
            "rows": [{**vars(r), **r.summary()} for r in rows.values()],
        }
        await anyio.Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return list(rows.values())


def _csv(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [convert(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sinks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--sinks", type=_csv(str), default=list(SINKS), help=",".join(SINKS + ON_REQUEST)
    )
    parser.add_argument(
        "--modes", type=_csv(str), default=["sink", "relay"], help="sink,relay[,limited,noop]"
    )
    parser.add_argument(
        "--concurrency", type=_csv(int), default=list(CONCURRENCY), help="e.g. 8,32,64"
    )
    parser.add_argument("--intents", type=int, default=5000, help="per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", LOCAL_DSN))
    parser.add_argument("--rabbitmq-url", default=URLS["rabbitmq"])
    parser.add_argument("--nats-url", default=URLS["nats"])
    parser.add_argument("--redis-url", default=URLS["redis"], help="for sidekiq and celery-redis")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--serve-webhook", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.sinks) - set(SINKS + ON_REQUEST) or set(args.modes) - set(MODE_LABELS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_webhook:
        asyncio.run(_serve_webhook())
        return 0
    anyio.run(run, args, backend_options=backend_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
