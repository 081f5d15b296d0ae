"""The ``celery`` kind on Redis: the task message laid out as kombu's Redis transport
stores it, LPUSHed onto the list named after the queue, where a Celery worker BRPOPs it.

The list item is kombu's JSON envelope (kombu/transport/virtual/base.py, ``prepare_message``
and ``basic_publish``; kombu/transport/redis.py, ``_put``)::

    {"body": "<base64 of the JSON body>", "content-encoding": "utf-8",
     "content-type": "application/json", "headers": {...protocol v2 headers...},
     "properties": {"correlation_id": "<task id>", "reply_to": "", "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": "<queue>"},
                    "priority": 0, "body_encoding": "base64", "delivery_tag": "<uuid4>"}}

Priority 0 goes to the list named exactly after the queue (kombu keeps the other priority
steps in ``<queue>\\x06\\x16<n>`` lists). The intent is ``sent`` once Redis has answered the
LPUSH; a batch is one pipeline (no MULTI: each push stands alone). A Redis error, a timeout
or a lost connection is transient. redis-py's own retries are off: the relay retries.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import anyio
import orjson
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.base import DeliversBatchOfOne, error_text
from worker.sinks.celery.message import CeleryTask, build_task
from worker.sinks.reconnect import ConnectGate
from worker.sinks.size import REDIS_DEFAULT, SizeLimit

__all__ = ["CeleryRedisSink", "envelope", "parse_redis_url"]

log = logging.getLogger(__name__)

_FLAG = "--celery-broker-url"


def parse_redis_url(url: str) -> tuple[str, str]:
    """Check ``redis[s]://[:pass@]host[:port][/db]``; return (url, host:port/db for logs)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"{_FLAG} cannot be parsed; percent-encode reserved characters in the password"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"{_FLAG} for Redis must start with redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError(f"{_FLAG} has no host")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"{_FLAG}: the Redis database must be a number, got {db!r}")
    return url.strip(), f"{parts.hostname}:{port or 6379}/{db}"


def envelope(task: CeleryTask) -> bytes:
    """The list item kombu's Redis transport would push for ``task``."""
    properties = task.properties | {
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": task.queue},
        "priority": 0,
        "body_encoding": "base64",
        # kombu's tag for acks (the worker's `unacked` hash): unique per push, as kombu's.
        "delivery_tag": str(uuid.uuid4()),
    }
    return orjson.dumps(
        {
            "body": base64.b64encode(task.body).decode(),
            "content-encoding": task.content_encoding,
            "content-type": task.content_type,
            "headers": task.headers,
            "properties": properties,
        }
    )


class CeleryRedisSink(DeliversBatchOfOne):
    """One redis-py client (a connection pool) per worker. After a connection failure the
    next delivery checks the server with a PING before using it again; deliveries that were
    waiting for that check share its failure (:class:`ConnectGate`)."""

    max_batch: int = 128  # a BatchSink: one pipeline per batch

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        id_prefix: str = "",
        name: str = "outbox-worker",
        max_bytes: int | None = None,
    ) -> None:
        self._url, self._where = parse_redis_url(url)
        self._size = SizeLimit("celery", max_bytes, REDIS_DEFAULT)
        password = urlsplit(self._url).password
        self._password = unquote(password) if password else None
        self._timeout = timeout
        self._id_prefix = id_prefix
        self._client = redis.asyncio.Redis.from_url(
            self._url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=name,
        )
        self._healthy = False  # checked (PING) before the first use and after a failure
        self._gate = ConnectGate(f"Redis {self._where}", log)
        self._closed = False

    def __repr__(self) -> str:
        return f"CeleryRedisSink({self._where})"

    def _reason(self, exc: BaseException) -> str:
        return error_text(exc, [self._password])

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        """LPUSH every valid intent's message in one pipeline; the timeout covers it all."""
        results: list[BaseException | None] = [None] * len(intents)
        todo: list[tuple[int, CeleryTask, bytes]] = []
        for i, intent in enumerate(intents):
            try:
                task = build_task(intent, self._id_prefix)
                item = envelope(task)
                self._size.check(f"celery message for queue {task.queue!r}", len(item))
                todo.append((i, task, item))
            except PermanentError as exc:
                results[i] = exc
        if not todo:
            return results
        replies: list[object] = []
        try:
            with anyio.fail_after(self._timeout):
                await self._ready()
                async with self._client.pipeline(transaction=False) as pipe:
                    for _, task, item in todo:
                        pipe.lpush(task.queue, item)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            replies = [exc] * len(todo)
        for (i, _, _), reply in zip(todo, replies, strict=True):
            if isinstance(reply, BaseException):
                results[i] = self._failure(reply)
        return results

    def _failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, TransientError):
            return TransientError(str(exc))  # one exception object per intent
        if isinstance(exc, TimeoutError | redis.exceptions.TimeoutError):
            self._healthy = False
            return TransientError(f"Redis {self._where}: no reply within {self._timeout:g}s")
        if isinstance(exc, redis.exceptions.ConnectionError | OSError):
            self._healthy = False
            return TransientError(f"Redis {self._where}: connection lost: {self._reason(exc)}")
        if isinstance(exc, redis.exceptions.RedisError):
            # OOM, READONLY replica, WRONGTYPE (the key is not a list)...: an operator fixes
            # the server, then the retry goes through.
            return TransientError(f"Redis {self._where}: {self._reason(exc)}")
        return exc

    async def _ready(self) -> None:
        if self._healthy:
            return
        async with self._gate.turn() as turn:  # one task checks, the others wait for it
            if self._closed:
                raise TransientError("the sink is closed")
            if not self._healthy:
                await turn.connect(self._connect)
                self._healthy = True

    async def _connect(self) -> None:
        try:
            await self._client.ping()
        except Exception as exc:
            raise TransientError(
                f"Redis {self._where}: cannot connect: {self._reason(exc)}"
            ) from None
        if not self._gate.down:  # else the gate says it is back
            log.info("connected to Redis %s", self._where)

    async def aclose(self) -> None:
        async with self._gate.lock:
            self._closed = True
            with anyio.move_on_after(2), anyio.CancelScope(shield=True):
                await self._client.aclose()
