"""The ``nats`` kind: a JetStream publish that counts only once the stream acknowledged it.

Payload::

    {"subject": "orders.created", "body": {...any JSON...},
     "headers": {"Tenant": "acme"}, "stream": "ORDERS"}

``Nats-Msg-Id`` is the intent id (with ``--message-id-prefix``), the same on every retry,
so JetStream drops a retried publish that it had stored already, as long as the retry comes
within the stream's duplicate window (``duplicate_window``, 2 minutes by default). The
optional ``stream`` is checked by the server (``Nats-Expected-Stream``). The intent's W3C
trace context, if any, goes into the headers (``traceparent``, ``tracestate``).

No PubAck in time, no stream for the subject, a server error or a lost connection are
transient; a payload the server can never take (too large, wrong expected stream) is
permanent.

``deliver_many`` (the ``BatchSink`` protocol) publishes a batch in order without waiting,
each with its own reply subject under one inbox subscription per connection, then waits
for the PubAcks together (one timeout for the whole batch). ``deliver`` is a batch of one.
nats-py's own ``publish_async`` is not used: a publish that fails in the client (too large,
buffer full while reconnecting) leaks its pending-ack slot there, for the connection's life.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import anyio
import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header, PubAck

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context
from worker.sinks.base import DeliversBatchOfOne, error_text
from worker.sinks.reconnect import ConnectGate
from worker.sinks.size import NATS_DEFAULT, SizeLimit
from worker.units import fmt_duration

__all__ = ["NatsSink", "build_publish", "parse_nats_url"]

log = logging.getLogger(__name__)

_FIELDS = frozenset({"subject", "body", "headers", "stream"})
_TOKEN_RE = re.compile(r"^[^\s.*>]+$")  # one subject token: no wildcard, no whitespace
# An HTTP token (RFC 9110), what nats-py accepts as a header name: it raises BadHeaderError,
# a transient-looking nats error, for anything else.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STREAM_RE = re.compile(r"^[^\s.*>/\\]{1,255}$")
# JetStream API error codes that retrying cannot fix.
_PERMANENT_ERR_CODES = {
    10054: "message larger than the stream allows",
    10060: "the subject is not in the expected stream",
}

_EXPECTED_STREAM = Header.EXPECTED_STREAM.value
_STATUS = Header.STATUS.value
_NO_RESPONDERS = "503"  # no stream captures the subject


def parse_nats_url(url: str) -> tuple[list[str], str]:
    """``nats://[user:pass@|token@]host[:port][,nats://...]`` -> (servers, hosts for logs)."""
    servers, shown = [], []
    for item in url.split(","):
        item = item.strip()
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            raise ConfigError(
                "--nats-url cannot be parsed; percent-encode reserved characters in the "
                "user name and password"
            ) from None
        if parts.scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError("--nats-url must start with nats://, tls://, ws:// or wss://")
        if not parts.hostname:
            raise ConfigError("--nats-url has no host")
        servers.append(item)
        shown.append(f"{parts.hostname}:{port or 4222}")
    return servers, ",".join(shown)


def _check_subject(subject: object) -> str:
    if not isinstance(subject, str) or not subject:
        raise PermanentError("nats payload needs 'subject', a non-empty string")
    if len(subject) > 1024 or not all(_TOKEN_RE.match(t) for t in subject.split(".")):
        raise PermanentError(
            f"nats subject {subject[:80]!r} is not valid for publishing: dot-separated tokens "
            "without whitespace or wildcards (* >)"
        )
    return subject


def _check_headers(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PermanentError("nats 'headers' must be an object of name -> string")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if not _HEADER_NAME_RE.match(name):
            raise PermanentError(f"nats header name {name[:40]!r} is not valid")
        if name.lower().startswith("nats-"):
            raise PermanentError(f"nats header {name!r}: Nats-* headers are set by the worker")
        if not isinstance(value, str) or _BAD_VALUE_RE.search(value):
            raise PermanentError(f"nats header {name!r} must be a string without line breaks")
        headers[name] = value
    return headers


def build_publish(
    intent: Intent, id_prefix: str = ""
) -> tuple[str, bytes, dict[str, str], str | None]:
    """Validate the payload -> (subject, data, headers, expected stream). Pure."""
    payload = intent.payload
    if not isinstance(payload, dict):
        raise PermanentError(f"nats payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise PermanentError("nats payload has unknown field(s): " + ", ".join(unknown))
    subject = _check_subject(payload.get("subject"))
    headers = dict(with_trace_context(_check_headers(payload.get("headers")), intent))
    headers["Nats-Msg-Id"] = f"{id_prefix}{intent.id}"
    stream = payload.get("stream")
    if stream is not None and not (isinstance(stream, str) and _STREAM_RE.match(stream)):
        raise PermanentError("nats 'stream' must be a stream name")
    return subject, orjson.dumps(payload.get("body")), headers, stream


def _header_bytes(headers: dict[str, str]) -> int:
    """The size of the header block nats-py writes for ``headers`` (``NATS/1.0``, one
    ``Name: value`` line each, a blank line)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(
        len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()
    )


def _pub_ack(reply: Msg) -> PubAck:
    """Read JetStream's answer to a publish, as ``JetStreamContext.publish`` does."""
    if reply.headers and reply.headers.get(_STATUS) == _NO_RESPONDERS:
        raise nats.js.errors.NoStreamResponseError
    answer = orjson.loads(reply.data)
    if "error" in answer:
        raise nats.js.errors.APIError.from_error(answer["error"])
    return PubAck.from_response(answer)


class NatsSink(DeliversBatchOfOne):
    """One NATS connection per worker, opened on first use; the client reconnects by itself
    after a drop (publishes in the meantime time out and are retried by the relay)."""

    # A BatchSink: up to this many intents per deliver_many. Throughput levels off at 64-128
    # per batch; more only adds to what one lost connection times out at once and to the
    # client's 2 MiB buffer for publishes made while it reconnects.
    max_batch: int = 128

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        id_prefix: str = "",
        reconnect_wait: float = 2.0,
        name: str = "outbox-worker",
        max_bytes: int | None = None,
    ) -> None:
        self._servers, self._where = parse_nats_url(url)
        self._size = SizeLimit("nats", max_bytes, NATS_DEFAULT)
        self._secrets: list[str] = []  # never shown in an error message
        for server in self._servers:
            parts = urlsplit(server)
            if parts.password:
                self._secrets.append(unquote(parts.password))
            elif parts.username:  # nats://TOKEN@host
                self._secrets.append(unquote(parts.username))
        self._timeout = timeout
        self._id_prefix = id_prefix
        self._reconnect_wait = reconnect_wait
        self._name = name
        self._client: Client | None = None
        self._inbox = ""  # the client's PubAck inbox prefix, "_INBOX.<nuid>."
        self._acks: dict[str, asyncio.Future[Msg]] = {}  # by token, until answered
        self._tokens = itertools.count()
        self._gate = ConnectGate(f"NATS {self._where}", log)
        self._lost_at = 0.0  # anyio.current_time() when the connection was last lost
        self._closed = False

    def __repr__(self) -> str:
        return f"NatsSink({self._where})"

    def _reason(self, exc: BaseException) -> str:
        return error_text(exc, self._secrets)

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        """Publish every valid intent in order, then wait for all the PubAcks at once."""
        results: list[BaseException | None] = [None] * len(intents)
        todo: list[tuple[int, str, bytes, dict[str, str]]] = []
        for i, intent in enumerate(intents):
            try:
                subject, data, headers, stream = build_publish(intent, self._id_prefix)
            except PermanentError as exc:
                results[i] = exc
                continue
            if stream is not None:
                headers[_EXPECTED_STREAM] = stream
            todo.append((i, subject, data, headers))
        if not todo:
            return results
        try:
            client, inbox = await self._connection()
        except TransientError as exc:
            for i, *_ in todo:
                results[i] = TransientError(str(exc))
            return results
        todo = [entry for entry in todo if not self._too_big(entry, client, results)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        tokens: list[str] = []
        acks: dict[int, asyncio.Future[Msg]] = {}
        try:
            for i, subject, data, headers in todo:
                token = str(next(self._tokens))
                # Registered before the publish: the PubAck may come back before it returns.
                acks[i] = self._acks[token] = loop.create_future()
                tokens.append(token)
                try:
                    await client.publish(subject, data, reply=inbox + token, headers=headers)
                except (nats.errors.Error, OSError) as exc:
                    del acks[i]
                    results[i] = self._failure(exc, subject, data)
            if acks:
                await asyncio.wait(acks.values(), timeout=max(deadline - loop.time(), 0))
        finally:
            for token in tokens:  # answered or not, nobody waits for these any more
                future = self._acks.pop(token, None)
                if future is not None:
                    future.cancel()
        for i, subject, data, _ in todo:
            if i in acks:
                results[i] = self._outcome(intents[i], acks[i], subject, data)
        return results

    def _too_big(
        self,
        entry: tuple[int, str, bytes, dict[str, str]],
        client: Client,
        results: list[BaseException | None],
    ) -> bool:
        """Over the server's max_payload (which counts the headers too): the server would
        close the connection, failing every publish in flight on it. Checked first."""
        i, subject, data, headers = entry
        size = len(data) + _header_bytes(headers)
        try:
            self._size.check(
                f"nats message to {subject!r}", size, client.max_payload, "the server's max_payload"
            )
        except PermanentError as exc:
            results[i] = exc
            return True
        return False

    def _outcome(
        self, intent: Intent, ack: asyncio.Future[Msg], subject: str, data: bytes
    ) -> BaseException | None:
        if ack.cancelled():
            return self._failure(TimeoutError(), subject, data)
        try:
            pub_ack = _pub_ack(ack.result())
        except Exception as exc:
            return self._failure(exc, subject, data)
        if pub_ack.duplicate:
            log.info(
                "intent %d: JetStream dropped the publish as a duplicate (stream %s, seq %d)",
                intent.id,
                pub_ack.stream,
                pub_ack.seq,
            )
        return None

    def _failure(self, exc: Exception, subject: str, data: bytes) -> BaseException:
        """The delivery error for a failed publish of ``data`` to ``subject``."""
        if isinstance(exc, nats.errors.MaxPayloadError):
            return PermanentError(
                f"nats message of {len(data)} bytes is larger than the server's max_payload"
            )
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            return TransientError(
                f"NATS {self._where}: no JetStream stream answered for subject {subject!r} "
                "(no stream captures it, or JetStream is unavailable)"
            )
        if isinstance(exc, nats.js.errors.APIError):
            known = _PERMANENT_ERR_CODES.get(exc.err_code or 0)
            if known:
                return PermanentError(f"JetStream refused the message: {known} ({exc})")
            return TransientError(f"JetStream error: {self._reason(exc)}")
        if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
            return TransientError(f"NATS {self._where}: no PubAck within {self._timeout:g}s")
        if isinstance(exc, nats.errors.Error | OSError | ValueError):
            return TransientError(f"NATS {self._where}: {self._reason(exc)}")
        return exc

    async def _connection(self) -> tuple[Client, str]:
        """The client, and the inbox prefix its PubAcks come back to."""
        client, inbox = self._client, self._inbox
        if client is not None and not client.is_closed:
            return client, inbox
        async with self._gate.turn() as turn:  # one task connects, the others wait for it
            if self._closed:
                raise TransientError("nats sink is closed")
            if self._client is not None and not self._client.is_closed:
                return self._client, self._inbox
            connected, self._inbox = await turn.connect(self._connect)
            self._client = connected
            return connected, self._inbox

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject.rpartition(".")[2], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _connect(self) -> tuple[Client, str]:
        client = nats.NATS()
        inbox = client.new_inbox() + "."
        try:
            # The client retries the first connect for ever (max_reconnect_attempts=-1), so
            # bound it here: the delivery fails as transient and the relay retries later.
            with anyio.fail_after(self._timeout):
                await client.connect(
                    servers=self._servers,
                    name=self._name,
                    # nats-py annotates these as int; it uses them as float seconds.
                    connect_timeout=min(self._timeout, 5.0),  # type: ignore[arg-type]
                    reconnect_time_wait=self._reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                # One subscription for every PubAck of this connection (the client renews
                # it after a reconnect); a publish's reply subject is inbox + its token.
                await client.subscribe(inbox + "*", cb=self._on_ack)
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await client.close()
            if isinstance(exc, Exception):
                why = "timed out" if isinstance(exc, TimeoutError) else self._reason(exc)
                raise TransientError(f"NATS {self._where}: cannot connect: {why}") from None
            raise
        if not self._gate.down:  # else the gate says it is back
            log.info("connected to NATS %s", self._where)
        return client, inbox

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS %s: %s", self._where, self._reason(exc))

    # An outage of an established connection, in the words of ConnectGate's: the client
    # reconnects by itself, every reconnect_wait seconds, and says nothing in between.
    async def _on_disconnected(self) -> None:
        if not self._closed:
            self._lost_at = anyio.current_time()
            log.warning(
                "NATS %s is down (connection lost); the client reconnects every %gs, its "
                "intents are retried meanwhile",
                self._where,
                self._reconnect_wait,
            )

    async def _on_reconnected(self) -> None:
        down = fmt_duration(anyio.current_time() - self._lost_at)
        log.warning("NATS %s is back after %s", self._where, down)

    async def aclose(self) -> None:
        async with self._gate.lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # nats-py fails to close a connection while reconnecting
                log.debug("closing the NATS connection: %s", self._reason(exc))
