"""The ``rabbitmq`` kind: publish to an exchange with publisher confirms (aio-pika).

Payload::

    {"exchange": "orders", "routing_key": "order.created", "body": {...any JSON...},
     "headers": {"tenant": "acme"}, "type": "OrderCreated", "mandatory": true}

The message is persistent (delivery mode 2), ``application/json``, and its ``message_id``
is the intent id (with ``--message-id-prefix``), the same on every retry, so a consumer can
drop a duplicate. The intent is sent only once the broker has confirmed the message. A nack,
an unroutable message (``mandatory``, the default: no queue is bound for the routing key),
a timeout or a connection lost before the confirm are transient. An exchange that does not
exist is permanent: it is checked once per exchange name on a throwaway channel, because the
broker answers a publish to a missing exchange by closing the channel, which would fail
every other publish in flight on it.

``deliver_many`` (the ``BatchSink`` protocol) publishes a batch in order on the one channel
and awaits the confirms together; each intent gets the outcome ``deliver`` would give it
(``deliver`` is a batch of one), and the timeout covers the whole batch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq.exceptions
import anyio
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.reconnect import ConnectGate

__all__ = ["RabbitMQSink", "build_message", "parse_amqp_url"]

log = logging.getLogger(__name__)

_FIELDS = frozenset({"exchange", "routing_key", "body", "headers", "type", "mandatory"})
_MAX_SHORTSTR = 255  # AMQP short strings: exchange names, routing keys, type
_EXCHANGE_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")  # what RabbitMQ accepts as a name


def parse_amqp_url(url: str) -> tuple[str, str]:
    """Check ``amqp[s]://user:pass@host[:port][/vhost]``; return (url, host:port for logs)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(
            "--rabbitmq-url cannot be parsed; percent-encode reserved characters in the "
            "user name and password"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError("--rabbitmq-url must start with amqp:// or amqps://")
    if not parts.hostname:
        raise ConfigError("--rabbitmq-url has no host")
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return url.strip(), f"{parts.hostname}:{port or default_port}"


def _check_name(what: str, value: object, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise PermanentError(f"rabbitmq payload needs '{what}', a string")
    if len(value.encode()) > _MAX_SHORTSTR:
        raise PermanentError(f"rabbitmq {what} is longer than {_MAX_SHORTSTR} bytes")
    return value


def build_message(intent: Intent, id_prefix: str = "") -> tuple[str, str, aio_pika.Message, bool]:
    """Validate the payload -> (exchange, routing_key, message, mandatory). Pure."""
    payload = intent.payload
    if not isinstance(payload, dict):
        raise PermanentError(
            f"rabbitmq payload must be a JSON object, got {type(payload).__name__}"
        )
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise PermanentError("rabbitmq payload has unknown field(s): " + ", ".join(unknown))
    exchange = _check_name("exchange", payload.get("exchange"), required=False)
    if not _EXCHANGE_RE.match(exchange):
        raise PermanentError(
            "rabbitmq exchange may contain only letters, digits and - _ . : characters"
        )
    routing_key = _check_name("routing_key", payload.get("routing_key"), required=True)
    message_type = _check_name("type", payload.get("type"), required=False) or None
    mandatory = payload.get("mandatory", True)
    if not isinstance(mandatory, bool):
        raise PermanentError("rabbitmq 'mandatory' must be true or false")
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(v, str | int | float | bool) for v in headers.values()
    ):
        raise PermanentError("rabbitmq 'headers' must be an object of name -> string/number/bool")
    message = aio_pika.Message(
        orjson.dumps(payload.get("body")),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"{id_prefix}{intent.id}",
        timestamp=intent.created_at,
        type=message_type,
        app_id="outbox-worker",
        headers=headers,
    )
    return exchange, routing_key, message, mandatory


# Errors that mean the connection or the channel is gone: reconnect on the next delivery.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
)


class _Pending:
    """An intent of the batch whose publish has not finished (yet)."""


_PENDING = _Pending()


def _copy(exc: BaseException) -> BaseException:
    """The same delivery error for another intent (one exception object per result)."""
    if isinstance(exc, TransientError):
        return TransientError(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, PermanentError):
        return PermanentError(str(exc))
    return exc


def _alive(connection: AbstractConnection) -> bool:
    # aio-pika sets `is_closed` only when we close it; a connection the broker or the network
    # dropped shows as not `connected`.
    return not connection.is_closed and connection.connected.is_set()


class RabbitMQSink:
    """One connection and one confirming channel per worker, opened on first use and
    reopened after a failure; concurrent deliveries and batches share the channel (confirms
    are pipelined, each delivery waits for its own)."""

    # A BatchSink: up to this many intents per deliver_many. Throughput is bound by the
    # broker's confirms of persistent messages and is flat from ~16 on; a bigger batch only
    # means more publishes failed at once by one closed channel (and more duplicates).
    max_batch: int = 128

    def __init__(
        self, url: str, *, timeout: float = 30.0, id_prefix: str = "", name: str = "outbox-worker"
    ) -> None:
        self._url, self._where = parse_amqp_url(url)
        password = urlsplit(self._url).password
        self._password = unquote(password) if password else None
        self._timeout = timeout
        self._id_prefix = id_prefix
        self._name = name
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._gate = ConnectGate(f"RabbitMQ {self._where}", log)
        self._known_exchanges: set[str] = {""}  # the default exchange always exists
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitMQSink({self._where})"

    def _redact(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _reason(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return self._redact(f"{type(exc).__name__}: {text}"[:300])

    async def deliver(self, intent: Intent) -> None:
        [error] = await self.deliver_many([intent])
        if error is not None:
            raise error

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        """Publish every valid intent in order on the shared channel, then wait for all the
        confirms at once; the timeout covers the whole batch."""
        results: list[BaseException | _Pending | None] = [None] * len(intents)
        todo: list[tuple[int, str, str, aio_pika.Message, bool]] = []
        for i, intent in enumerate(intents):
            try:
                todo.append((i, *build_message(intent, self._id_prefix)))
            except PermanentError as exc:
                results[i] = exc
            else:
                results[i] = _PENDING

        async def publish(
            i: int, exchange: AbstractExchange, routing_key: str, message: aio_pika.Message,
            mandatory: bool,
        ) -> None:  # fmt: skip
            try:
                await exchange.publish(message, routing_key, mandatory=mandatory)
            except Exception as exc:
                results[i] = self._failure(exc, exchange.name, routing_key)
            else:
                results[i] = None

        exchanges: dict[str, AbstractExchange | BaseException] = {}
        with anyio.move_on_after(self._timeout):
            try:
                connection, channel = await self._ready()
                for _, name, *_ in todo:
                    if name not in exchanges:
                        exchanges[name] = await self._checked_exchange(connection, channel, name)
            except Exception as exc:
                for i, name, routing_key, *_ in todo:
                    results[i] = _copy(self._failure(exc, name, routing_key))
                todo = []
            jobs = []
            for i, name, routing_key, message, mandatory in todo:
                exchange = exchanges[name]
                if isinstance(exchange, BaseException):
                    results[i] = _copy(exchange)
                else:
                    jobs.append((i, exchange, routing_key, message, mandatory))
            if len(jobs) == 1:
                await publish(*jobs[0])
            elif jobs:
                # Started in order; each takes the channel's lock (FIFO) to write its frames,
                # so the broker gets them in batch order. Confirms are awaited concurrently.
                async with anyio.create_task_group() as tg:
                    for job in jobs:
                        tg.start_soon(publish, *job)
        return [
            self._failure(TimeoutError(), "", "") if isinstance(r, _Pending) else r for r in results
        ]

    async def _checked_exchange(
        self, connection: AbstractConnection, channel: AbstractChannel, name: str
    ) -> AbstractExchange | BaseException:
        """The exchange to publish to, or the permanent error if it does not exist."""
        try:
            await self._check_exchange(connection, name)
        except PermanentError as exc:
            return exc
        return await self._exchange(channel, name)

    def _failure(self, exc: Exception, exchange_name: str, routing_key: str) -> BaseException:
        """The delivery error for a failed publish to ``exchange_name`` with ``routing_key``."""
        if isinstance(exc, PermanentError | TransientError):
            return exc
        if isinstance(exc, TimeoutError):
            return TransientError(f"RabbitMQ {self._where}: no confirm within {self._timeout:g}s")
        if isinstance(exc, aio_pika.exceptions.PublishError):
            return TransientError(
                f"RabbitMQ returned the message as unroutable: no queue bound to exchange "
                f"{exchange_name!r} for routing key {routing_key!r}"
            )
        if isinstance(exc, aio_pika.exceptions.DeliveryError):
            return TransientError(f"RabbitMQ nacked the message: {self._reason(exc)}")
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            # The exchange existed when we checked: deleted since, or this is collateral
            # damage from another publish on the shared channel. Check again next time.
            self._known_exchanges.discard(exchange_name)
            return TransientError(f"RabbitMQ {self._where}: {self._reason(exc)}")
        if isinstance(exc, _CONNECTION_LOST):
            return TransientError(
                f"RabbitMQ {self._where}: connection lost before the confirm: {self._reason(exc)}"
            )
        return exc

    async def _ready(self) -> tuple[AbstractConnection, AbstractChannel]:
        connection, channel = self._connection, self._channel
        if connection and channel and not channel.is_closed and _alive(connection):
            return connection, channel
        async with self._gate.turn() as turn:  # one task reconnects, the others wait for it
            if self._closed:
                raise TransientError("rabbitmq sink is closed")
            if self._connection is None or not _alive(self._connection):
                self._connection = await turn.connect(self._reconnect)
            if self._channel is None or self._channel.is_closed or self._channel is channel:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._connection, self._channel

    async def _reconnect(self) -> AbstractConnection:
        await self._close_connection()  # never raises TransientError
        return await self._connect()

    async def _connect(self) -> AbstractConnection:
        try:
            connection = await aio_pika.connect(
                self._url, timeout=self._timeout, client_properties={"connection_name": self._name}
            )
        except Exception as exc:
            raise TransientError(
                f"RabbitMQ {self._where}: cannot connect: {self._reason(exc)}"
            ) from None
        if not self._gate.down:  # else the gate says it is back
            log.info("connected to RabbitMQ %s", self._where)
        return connection

    async def _check_exchange(self, connection: AbstractConnection, name: str) -> None:
        """Passive declare on a channel of its own (a 404 closes the channel it happens on)."""
        if name in self._known_exchanges:
            return
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise PermanentError(
                f"RabbitMQ exchange {name!r} does not exist (declare it, or fix the payload)"
            ) from None
        finally:
            if not channel.is_closed:
                await channel.close()
        self._known_exchanges.add(name)

    async def _exchange(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        if name == "":
            return channel.default_exchange
        return await channel.get_exchange(name, ensure=False)

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with anyio.move_on_after(2), anyio.CancelScope(shield=True):
                try:
                    await connection.close()
                except Exception as exc:  # closing a broken connection: nothing to do
                    log.debug("closing the RabbitMQ connection: %s", self._reason(exc))

    async def aclose(self) -> None:
        async with self._gate.lock:
            self._closed = True
            await self._close_connection()
