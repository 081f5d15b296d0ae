"""The ``sidekiq`` kind: push a job into Sidekiq's Redis exactly as Sidekiq's Ruby client does,
so that an unmodified Sidekiq server runs it.

Payload::

    {"class": "WelcomeEmailJob", "args": [42], "queue": "default", "retry": true,
     "at": 1767225600.0, "tags": ["signup"], "retry_queue": "low", "backtrace": 10,
     "dead": true}

``class`` and ``args`` are required; the rest is optional, with Sidekiq's defaults
(``queue`` "default", ``retry`` true). The job hash gets ``jid`` (see :func:`job_id`),
``created_at`` (when the intent was committed) and, when pushed to a queue, ``enqueued_at``
(now), both epoch seconds as floats, as Sidekiq 6 and 7 write them, and the intent's W3C
trace context, if any, as the top-level fields ``traceparent`` and ``tracestate``. Like
``Sidekiq::Client#atomic_push``: a job is ``SADD queues NAME`` + ``LPUSH queue:NAME json``;
a job with a future ``at`` is ``ZADD schedule at json`` (no ``enqueued_at``: the server's
poller sets it when the job is due), and an ``at`` already past is pushed at once, as
``perform_at`` does. A batch is one MULTI/EXEC round trip (Sidekiq's client pipelines;
MULTI also keeps a job from being half-pushed).

A payload Sidekiq's client would refuse, or that the server could never run, is permanent;
a Redis error, a timeout or a lost connection is transient.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context
from worker.sinks.base import DeliversBatchOfOne, copy_error, error_text
from worker.sinks.reconnect import ConnectGate
from worker.sinks.size import REDIS_DEFAULT, SizeLimit

__all__ = ["Job", "SidekiqSink", "build_job", "job_id", "parse_redis_url"]

log = logging.getLogger(__name__)

_OPTIONAL = frozenset({"queue", "retry", "at", "tags", "retry_queue", "backtrace", "dead"})
_FIELDS = _OPTIONAL | {"class", "args"}
_SET_BY_WORKER = frozenset({"jid", "created_at", "enqueued_at"})
# What Ruby's constantize resolves: constant names, optionally namespaced (Admin::MailJob).
_CLASS_RE = re.compile(r"^(::)?[A-Z][A-Za-z0-9_]*(::[A-Z][A-Za-z0-9_]*)*$")
# Sidekiq reads an `at` below this as an interval, not a time (Sidekiq::Job#at).
_MIN_EPOCH = 1_000_000_000


def parse_redis_url(url: str) -> tuple[str, str]:
    """Check ``redis[s]://[[user]:pass@]host[:port][/db]``; return (url, host:port/db for logs)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(
            "--sidekiq-redis-url cannot be parsed; percent-encode reserved characters in the "
            "password"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError("--sidekiq-redis-url must start with redis:// or rediss://")
    if not parts.hostname:
        raise ConfigError("--sidekiq-redis-url has no host")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"--sidekiq-redis-url: the database must be a number, not {db!r}")
    return url.strip(), f"{parts.hostname}:{port or 6379}/{int(db)}"


def job_id(intent_id: int, id_prefix: str = "") -> str:
    """The job's ``jid``: the first 24 hex digits of SHA-256 of ``<prefix><intent id>``, as
    long as the ``SecureRandom.hex(12)`` jid Sidekiq makes, and the same on every push of the
    intent. In Ruby: ``Digest::SHA256.hexdigest("#{prefix}#{id}")[0, 24]``."""
    return hashlib.sha256(f"{id_prefix}{intent_id}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Job:
    """A validated job: its hash without ``enqueued_at``, its queue, and ``at`` if scheduled."""

    item: dict[str, Any]
    queue: str
    at: float | None


def _fail(message: str) -> PermanentError:
    return PermanentError(f"sidekiq {message}")


def _check_options(payload: dict[str, Any]) -> dict[str, Any]:
    """The optional fields, checked as Sidekiq's client and server read them."""
    options: dict[str, Any] = {}
    queue = payload.get("queue", "default")
    if not isinstance(queue, str) or not queue:
        raise _fail("'queue' must be a non-empty string")
    retry = payload.get("retry", True)
    if not (isinstance(retry, bool) or (isinstance(retry, int) and retry >= 0)):
        raise _fail("'retry' must be true, false or a number of retries")
    options.update(retry=retry, queue=queue)
    if "tags" in payload:
        tags = payload["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _fail("'tags' must be a list of strings")
        options["tags"] = tags
    if "retry_queue" in payload:
        if not isinstance(payload["retry_queue"], str) or not payload["retry_queue"]:
            raise _fail("'retry_queue' must be a non-empty string")
        options["retry_queue"] = payload["retry_queue"]
    if "backtrace" in payload:
        backtrace = payload["backtrace"]
        if not (isinstance(backtrace, bool) or (isinstance(backtrace, int) and backtrace >= 0)):
            raise _fail("'backtrace' must be true, false or a number of lines")
        options["backtrace"] = backtrace
    if "dead" in payload:
        if not isinstance(payload["dead"], bool):
            raise _fail("'dead' must be true or false")
        options["dead"] = payload["dead"]
    return options


def _check_at(at: object) -> float | None:
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise _fail("'at' must be a number: the time to run the job, in epoch seconds")
    if at < _MIN_EPOCH:
        raise _fail(
            f"'at' {at!r} is not a time in epoch seconds (for a delay, add it to the time of "
            "the enqueue, or set the intent's run_at)"
        )
    return float(at)


def build_job(intent: Intent, id_prefix: str = "") -> Job:
    """Validate the payload -> the job. Pure."""
    payload = intent.payload
    if not isinstance(payload, dict):
        raise _fail(f"payload must be a JSON object, got {type(payload).__name__}")
    reserved = sorted(str(k) for k in payload if k in _SET_BY_WORKER)
    if reserved:
        raise _fail(f"payload field(s) {', '.join(reserved)} are set by the worker")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise _fail("payload has unknown field(s): " + ", ".join(unknown))
    cls = payload.get("class")
    if not isinstance(cls, str) or not cls:
        raise _fail("payload needs 'class', the job class name (a non-empty string)")
    if not _CLASS_RE.match(cls):
        raise _fail(f"'class' {cls[:80]!r} is not a Ruby class name (like WelcomeEmailJob)")
    if "args" not in payload:
        raise _fail("payload needs 'args', the list of perform's arguments ([] for none)")
    args = payload["args"]
    if not isinstance(args, list):
        raise _fail(f"'args' must be a list, got {type(args).__name__}")
    options = _check_options(payload)
    job = {
        **options,
        "class": cls,
        "args": args,
        "jid": job_id(intent.id, id_prefix),
        "created_at": intent.created_at.timestamp(),
    }
    item = dict(with_trace_context(job, intent))  # top-level fields, where Ruby's OTel looks
    return Job(item, options["queue"], _check_at(payload.get("at")))


def _dumps(item: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(item)
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits (jsonb allows it)
        raise _fail(f"job cannot be written as JSON: {exc}") from None


@dataclass
class _Commands:
    """One MULTI/EXEC: its commands in order, each with the batch entries it pushes."""

    queues: dict[str, list[tuple[int, bytes]]]  # queue -> (entry, job JSON), batch order
    scheduled: list[tuple[int, float, bytes]]  # (entry, at, job JSON)

    def entries(self) -> list[list[int]]:
        """Per command of the transaction, in order: which batch entries depend on it."""
        out = []
        if self.queues:
            out.append([i for jobs in self.queues.values() for i, _ in jobs])  # SADD queues
            out.extend([i for i, _ in jobs] for jobs in self.queues.values())  # LPUSH each
        if self.scheduled:
            out.append([i for i, _, _ in self.scheduled])  # ZADD schedule
        return out


class SidekiqSink(DeliversBatchOfOne):
    """One redis-py client (and its connection pool) per worker; a batch is one
    transaction on one pooled connection, so concurrent batches go in parallel."""

    # A BatchSink: up to this many jobs per MULTI/EXEC (Sidekiq's push_bulk advises at most
    # ~1,000 per call; beyond ~100 a batch saves little and fails more jobs at once).
    max_batch: int = 128

    def __init__(
        self, url: str, *, timeout: float = 10.0, id_prefix: str = "", max_bytes: int | None = None
    ) -> None:
        self._url, self._where = parse_redis_url(url)
        self._size = SizeLimit("sidekiq", max_bytes, REDIS_DEFAULT)
        password = urlsplit(self._url).password
        self._password = unquote(password) if password else None
        self._timeout = timeout
        self._id_prefix = id_prefix
        self._client: Redis | None = None
        self._healthy = False  # False: ping (once, behind the gate) before the next push
        self._gate = ConnectGate(f"Redis {self._where}", log)
        self._closed = False

    def __repr__(self) -> str:
        return f"SidekiqSink({self._where})"

    def _reason(self, exc: BaseException) -> str:
        return error_text(exc, [self._password])

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        """Push every valid job of the batch in one MULTI/EXEC; one outcome per intent."""
        results: list[BaseException | None] = [None] * len(intents)
        commands = _Commands({}, [])
        now = time.time()
        for i, intent in enumerate(intents):
            try:
                job = build_job(intent, self._id_prefix)
                later = job.at is not None and job.at > now
                entry = _dumps(job.item if later else {**job.item, "enqueued_at": now})
                self._size.check(f"sidekiq job {job.item['class']}", len(entry))
                if job.at is not None and later:
                    commands.scheduled.append((i, job.at, entry))
                else:
                    commands.queues.setdefault(job.queue, []).append((i, entry))
            except PermanentError as exc:
                results[i] = exc
        entries = commands.entries()
        if not entries:
            return results
        try:
            client = await self._ready()
            with anyio.fail_after(self._timeout):
                replies = await self._execute(client, commands)
        except Exception as exc:
            error = self._failure(exc)
            for i in {i for group in entries for i in group}:
                results[i] = copy_error(error)
            return results
        for group, reply in zip(entries, replies, strict=True):
            if isinstance(reply, Exception):  # e.g. WRONGTYPE: that queue's key is no list
                for i in group:
                    results[i] = results[i] or self._failure(reply)
        return results

    async def _execute(self, client: Redis, commands: _Commands) -> list[Any]:
        async with client.pipeline(transaction=True) as pipe:
            if commands.queues:
                pipe.sadd("queues", *commands.queues)
                for queue, jobs in commands.queues.items():
                    # LPUSH a b c leaves c at the head; the server pops from the tail: a first.
                    pipe.lpush(f"queue:{queue}", *(entry for _, entry in jobs))
            if commands.scheduled:
                pipe.zadd("schedule", {entry: at for _, at, entry in commands.scheduled})
            return await pipe.execute(raise_on_error=False)

    def _failure(self, exc: Exception) -> BaseException:
        """The delivery error for a failed push (and whether to ping before the next one)."""
        if isinstance(exc, PermanentError | TransientError):
            return exc
        if isinstance(exc, TimeoutError | redis_errors.TimeoutError):
            self._healthy = False
            return TransientError(f"Redis {self._where}: no reply within {self._timeout:g}s")
        if isinstance(exc, redis_errors.ConnectionError | OSError):
            self._healthy = False
            return TransientError(f"Redis {self._where}: connection lost: {self._reason(exc)}")
        if isinstance(exc, redis_errors.RedisError):  # WRONGTYPE, OOM, READONLY...
            return TransientError(f"Redis {self._where} refused the push: {self._reason(exc)}")
        return exc

    async def _ready(self) -> Redis:
        client = self._client
        if client is not None and self._healthy:
            return client
        async with self._gate.turn() as turn:  # one task pings, the others wait for it
            if self._closed:
                raise TransientError("sidekiq sink is closed")
            if self._client is None or not self._healthy:
                self._client = await turn.connect(self._connect)
                self._healthy = True
            return self._client

    async def _connect(self) -> Redis:
        """Ping Redis with the worker's one client (made on first use). Its pool replaces a
        dropped connection by itself; the ping only makes a Redis that is down cost one
        timeout for all waiting deliveries, not one each."""
        if self._client is None:
            self._client = Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=min(self._timeout, 5.0),
                # No retries inside redis-py: a transaction retried after its EXEC went out
                # would push the jobs twice. The relay retries, with backoff, and counts them.
                retry=Retry(NoBackoff(), 0),
            )
        client = self._client
        try:
            with anyio.fail_after(self._timeout):
                await client.ping()
        except Exception as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else self._reason(exc)
            raise TransientError(f"Redis {self._where}: cannot connect: {why}") from None
        if not self._gate.down:  # else the gate says it is back
            log.info("connected to Redis %s for the sidekiq kind", self._where)
        return client

    async def aclose(self) -> None:
        async with self._gate.lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            await client.aclose()
