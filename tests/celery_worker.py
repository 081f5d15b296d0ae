"""A real Celery worker (tests/celery_app.py) in a subprocess, and the brokers it uses.

Each test gets its own queue name; the worker consumes only that queue (``-Q``) and its
tasks write what they ran to a file of the test's own. RabbitMQ is 127.0.0.1:5672
(OUTBOX_TEST_RABBITMQ_URL), Redis 127.0.0.1:6379 (OUTBOX_TEST_REDIS_URL). A broker that does
not answer skips the test with one line naming it, or fails it in CI.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from tests import services
from tests.conftest import wait_until

_ROOT = Path(__file__).resolve().parent.parent


def broker_url(transport: str) -> str:
    """The broker's URL, once it accepts connections (tests/services.py: skip or fail)."""
    return services.rabbitmq_url() if transport == "amqp" else services.redis_url()


def queue_name() -> str:
    return f"outbox_celery_{secrets.token_hex(4)}"


class CeleryWorker:
    """``celery worker`` consuming ``queue`` from ``url``; ``runs()`` reads what it ran."""

    def __init__(self, url: str, queue: str, workdir: Path) -> None:
        self.url, self.queue = url, queue
        self.record = workdir / f"{queue}.jsonl"
        self.log = workdir / f"{queue}.log"

    def runs(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def ids(self) -> list[str]:
        return [run["id"] for run in self.runs()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @contextmanager
    def running(self) -> Iterator[CeleryWorker]:
        env = {**os.environ, "OUTBOX_TEST_CELERY_RECORD": str(self.record)}
        command = [
            sys.executable, "-m", "celery", "-b", self.url, "-A", "tests.celery_app", "worker",
            "--pool", "solo", "-Q", self.queue, "--loglevel", "info",
            "--without-heartbeat", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        with self.log.open("w") as log:
            proc = subprocess.Popen(
                command, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            yield self
        finally:
            # The test is over and its queue is dropped next: no shutdown to wait for (a cold
            # shutdown on RabbitMQ waited ~3 s for its connection).
            proc.kill()
            proc.wait()

    async def ready(self) -> None:
        """Wait until the worker consumes its queue."""
        await wait_until(lambda: " ready." in self.log_text(), timeout=60)

    async def ran(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        """Wait until the worker has run at least ``n`` tasks; return every run."""
        try:
            await wait_until(lambda: len(self.runs()) >= n, timeout=timeout, interval=0.05)
        except TimeoutError:
            log = self.log_text()[-3000:]
            raise AssertionError(f"the worker ran {len(self.runs())} of {n}; log:\n{log}") from None
        return self.runs()


async def forget_queue(transport: str, url: str, queue: str) -> None:
    """Remove what the worker declared for ``queue`` on the broker."""
    if transport == "amqp":
        import aio_pika

        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.exchange_delete(queue)
        finally:
            await connection.close()
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        try:
            await client.delete(
                queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
            )
        finally:
            await client.aclose()


@asynccontextmanager
async def running_worker(transport: str, tmp_path: Path) -> AsyncIterator[CeleryWorker]:
    """A Celery worker on a queue of its own, ready to run tasks; its queue is removed from
    the broker afterwards."""
    url = broker_url(transport)
    celery = CeleryWorker(url, queue_name(), tmp_path)
    try:
        with celery.running():
            await celery.ready()
            yield celery
    finally:
        await forget_queue(transport, url, celery.queue)
