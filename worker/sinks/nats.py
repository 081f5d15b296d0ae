"""The ``nats`` kind: a JetStream publish that counts only once the stream acknowledged it.

Payload::

    {"subject": "orders.created", "body": {...any JSON...},
     "headers": {"Tenant": "acme"}, "stream": "ORDERS"}

``Nats-Msg-Id`` is the intent id (with ``--message-id-prefix``), the same on every retry,
so JetStream drops a retried publish that it had stored already, as long as the retry comes
within the stream's duplicate window (``duplicate_window``, 2 minutes by default). The
optional ``stream`` is checked by the server (``Nats-Expected-Stream``).

No PubAck in time, no stream for the subject, a server error or a lost connection are
transient; a payload the server can never take (too large, wrong expected stream) is
permanent.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote, urlsplit

import anyio
import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.reconnect import ConnectGate

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
    headers = _check_headers(payload.get("headers"))
    headers["Nats-Msg-Id"] = f"{id_prefix}{intent.id}"
    stream = payload.get("stream")
    if stream is not None and not (isinstance(stream, str) and _STREAM_RE.match(stream)):
        raise PermanentError("nats 'stream' must be a stream name")
    return subject, orjson.dumps(payload.get("body")), headers, stream


class NatsSink:
    """One NATS connection per worker, opened on first use; the client reconnects by itself
    after a drop (publishes in the meantime time out and are retried by the relay)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        id_prefix: str = "",
        reconnect_wait: float = 2.0,
        name: str = "outbox-worker",
    ) -> None:
        self._servers, self._where = parse_nats_url(url)
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
        self._js: JetStreamContext | None = None
        self._gate = ConnectGate()
        self._closed = False

    def __repr__(self) -> str:
        return f"NatsSink({self._where})"

    def _reason(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split())
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]

    async def deliver(self, intent: Intent) -> None:
        subject, data, headers, stream = build_publish(intent, self._id_prefix)
        js = await self._jetstream()
        try:
            ack = await js.publish(
                subject, data, timeout=self._timeout, stream=stream, headers=headers
            )
        except nats.errors.MaxPayloadError:
            raise PermanentError(
                f"nats message of {len(data)} bytes is larger than the server's max_payload"
            ) from None
        except nats.js.errors.NoStreamResponseError:
            raise TransientError(
                f"NATS {self._where}: no JetStream stream answered for subject {subject!r} "
                "(no stream captures it, or JetStream is unavailable)"
            ) from None
        except nats.js.errors.APIError as exc:
            known = _PERMANENT_ERR_CODES.get(exc.err_code or 0)
            if known:
                raise PermanentError(f"JetStream refused the message: {known} ({exc})") from None
            raise TransientError(f"JetStream error: {self._reason(exc)}") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise TransientError(
                f"NATS {self._where}: no PubAck within {self._timeout:g}s"
            ) from None
        except (nats.errors.Error, OSError) as exc:
            raise TransientError(f"NATS {self._where}: {self._reason(exc)}") from None
        if ack.duplicate:
            log.info(
                "intent %d: JetStream dropped the publish as a duplicate (stream %s, seq %d)",
                intent.id,
                ack.stream,
                ack.seq,
            )

    async def _jetstream(self) -> JetStreamContext:
        client, js = self._client, self._js
        if client is not None and js is not None and not client.is_closed:
            return js
        async with self._gate.turn() as turn:  # one task connects, the others wait for it
            if self._closed:
                raise TransientError("nats sink is closed")
            if self._client is None or self._client.is_closed or self._js is None:
                self._client = await turn.connect(self._connect)
                self._js = self._client.jetstream(timeout=self._timeout)
            return self._js

    async def _connect(self) -> Client:
        client = nats.NATS()
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
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await client.close()
            if isinstance(exc, Exception):
                why = "timed out" if isinstance(exc, TimeoutError) else self._reason(exc)
                raise TransientError(f"NATS {self._where}: cannot connect: {why}") from None
            raise
        log.info("connected to NATS %s", self._where)
        return client

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS %s: %s", self._where, self._reason(exc))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("NATS %s: connection lost; reconnecting", self._where)

    async def _on_reconnected(self) -> None:
        log.info("NATS %s: reconnected", self._where)

    async def aclose(self) -> None:
        async with self._gate.lock:
            self._closed = True
            client, self._client, self._js = self._client, None, None
        if client is not None:
            await client.close()
