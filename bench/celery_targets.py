"""The celery kind's bench targets (bench/sinks.py): the ``celery`` sink pushing to a queue
on RabbitMQ (``celery-amqp``) and on Redis (``celery-redis``), and, as the road not taken,
Celery's own client (``app.send_task``, kombu, in threads) on RabbitMQ with publisher
confirms (``kombu-amqp``). No Celery worker consumes the queue: what arrived is counted on
the broker (the queue's message count, the list's length)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

import anyio

from worker.intent import Intent

PAYLOAD = {"task": "myapp.tasks.send_welcome", "args": [42], "kwargs": {"lang": "en"}}


def _versions(broker: str) -> str:
    return f"celery kind: {broker}"


@contextlib.asynccontextmanager
async def _amqp_queue(url: str) -> AsyncIterator[tuple[str, Any, str]]:
    """A durable queue, declared as a Celery worker would: (name, channel, broker version)."""
    import aio_pika

    name = f"outbox_bench_celery_{secrets.token_hex(4)}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, durable=True)
        properties = (
            connection.transport.connection.server_properties if connection.transport else {}
        )
        version = properties.get("version", b"?")
        try:
            yield name, channel, version.decode() if isinstance(version, bytes) else str(version)
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await channel.exchange_delete(name)  # Celery's client declares one of that name
    finally:
        await connection.close()


async def _message_count(channel: Any, name: str) -> int:
    declared = await channel.declare_queue(name, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def _purge(channel: Any, name: str) -> None:
    await (await channel.declare_queue(name, passive=True)).purge()


@contextlib.asynccontextmanager
async def celery_amqp_target(url: str) -> AsyncIterator[Any]:
    from bench.sinks import Target
    from worker.sinks.celery import celery_sink

    async with _amqp_queue(url) as (name, channel, version):
        yield Target(
            "celery",
            PAYLOAD | {"queue": name},
            lambda c, prefix: celery_sink(url, timeout=30, id_prefix=prefix),
            lambda: _message_count(channel, name),
            lambda: _purge(channel, name),
            _versions(f"aio-pika {metadata.version('aio-pika')}, RabbitMQ {version}"),
        )


@contextlib.asynccontextmanager
async def celery_redis_target(url: str) -> AsyncIterator[Any]:
    import redis.asyncio

    from bench.sinks import Target
    from worker.sinks.celery import celery_sink

    name = f"outbox_bench_celery_{secrets.token_hex(4)}"
    client = redis.asyncio.Redis.from_url(url)
    try:
        server = (await client.info("server"))["redis_version"]

        async def received() -> int:
            return int(await client.llen(name))

        async def reset() -> None:
            await client.delete(name)

        yield Target(
            "celery",
            PAYLOAD | {"queue": name},
            lambda c, prefix: celery_sink(url, timeout=30, id_prefix=prefix),
            received,
            reset,
            _versions(f"redis-py {metadata.version('redis')}, Redis {server}"),
        )
    finally:
        await client.delete(name)
        await client.aclose()


class KombuSink:
    """What the celery kind would be on Celery's own client: ``app.send_task`` (kombu and
    py-amqp, blocking) in a worker thread, with publisher confirms (``confirm_publish``) so
    that a return means the broker has the message."""

    def __init__(self, url: str, queue: str, threads: int) -> None:
        from celery import Celery

        self._app = Celery("bench", broker=url, set_as_current=False)
        self._app.conf.update(
            broker_transport_options={"confirm_publish": True},
            broker_pool_limit=threads,
            task_ignore_result=True,
        )
        self._queue = queue
        self._limiter = anyio.CapacityLimiter(threads)

    def _send(self, intent: Intent) -> None:
        payload = intent.payload
        self._app.send_task(
            payload["task"], args=payload["args"], kwargs=payload["kwargs"], queue=self._queue
        )

    async def deliver(self, intent: Intent) -> None:
        await anyio.to_thread.run_sync(self._send, intent, limiter=self._limiter)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._app.close)


@contextlib.asynccontextmanager
async def kombu_amqp_target(url: str) -> AsyncIterator[Any]:
    from bench.sinks import Target

    async with _amqp_queue(url) as (name, channel, _):
        yield Target(
            "celery",
            PAYLOAD | {"queue": name},
            lambda c, prefix: KombuSink(url, name, threads=c),
            lambda: _message_count(channel, name),
            lambda: _purge(channel, name),
            f"Celery's client: celery {metadata.version('celery')}, kombu "
            f"{metadata.version('kombu')}, py-amqp {metadata.version('amqp')}",
        )
