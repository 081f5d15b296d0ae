"""One confirming AMQP channel per worker (aio-pika), shared by the broker sinks that
publish to RabbitMQ: the ``rabbitmq`` kind and the ``celery`` kind on an ``amqp://`` broker.

:class:`AmqpPublisher` owns the connection and the channel in confirm mode, reopens them
after a failure (one task reconnects, the others wait: :class:`ConnectGate`), and publishes
a batch in order, awaiting the confirms together. Each entry gets ``None`` (confirmed) or
the error that says what to do with its intent: a nack, an unroutable message, a timeout or
a connection lost before the confirm are transient; an exchange that does not exist is
permanent. That is checked once per exchange name on a throwaway channel, because the
broker answers a publish to a missing exchange by closing the channel, which would fail
every other publish in flight on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq.exceptions
import anyio
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.base import DeliversBatchOfOne, copy_error, error_text
from worker.sinks.reconnect import ConnectGate
from worker.sinks.size import SizeLimit, rabbitmq_default

__all__ = ["AmqpPublisher", "Publish", "parse_amqp_url"]

log = logging.getLogger(__name__)


def parse_amqp_url(url: str, flag: str = "--rabbitmq-url") -> tuple[str, str]:
    """Check ``amqp[s]://user:pass@host[:port][/vhost]``; return (url, host:port for logs)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"{flag} cannot be parsed; percent-encode reserved characters in the "
            "user name and password"
        ) from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"{flag} must start with amqp:// or amqps://")
    if not parts.hostname:
        raise ConfigError(f"{flag} has no host")
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return url.strip(), f"{parts.hostname}:{port or default_port}"


@dataclass(frozen=True, slots=True)
class Publish:
    """One message to publish: where to, and whether the broker must route it somewhere."""

    exchange: str
    routing_key: str
    message: aio_pika.Message
    mandatory: bool = True


# Errors that mean the connection or the channel is gone: reconnect on the next delivery.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
)


class _Pending:
    """An entry of the batch whose publish has not finished (yet)."""


_PENDING = _Pending()


def _alive(connection: AbstractConnection) -> bool:
    # aio-pika sets `is_closed` only when we close it; a connection the broker or the network
    # dropped shows as not `connected`.
    return not connection.is_closed and connection.connected.is_set()


def _server_version(connection: AbstractConnection) -> str | None:
    """The broker's version from the connection's server properties (``"3.10.8"``)."""
    try:
        version = connection.transport.connection.server_properties.get("version")  # type: ignore[union-attr]
    except AttributeError:
        return None
    if isinstance(version, bytes):
        return version.decode(errors="replace")
    return version if isinstance(version, str) else None


class AmqpPublisher(DeliversBatchOfOne):
    """One connection and one confirming channel, opened on first use and reopened after a
    failure; concurrent batches share the channel (confirms are pipelined, each publish
    waits for its own).

    A sink subclasses it and says what to publish for an intent (:meth:`_entry`); it then is
    a ``BatchSink``: ``deliver_many`` publishes a batch in order and awaits the confirms
    together, each intent gets the outcome ``deliver`` would give it (``deliver`` is a batch
    of one), and the timeout covers the whole batch.
    """

    # Up to this many intents per deliver_many. Throughput is bound by the broker's
    # confirms of persistent messages and is flat from ~16 on; a bigger batch only means
    # more publishes failed at once by one closed channel (and more duplicates).
    max_batch: int = 128

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        name: str = "outbox-worker",
        flag: str = "--rabbitmq-url",
        kind: str = "rabbitmq",
        max_bytes: int | None = None,
    ) -> None:
        self._url, self._where = parse_amqp_url(url, flag)
        self._max_bytes = max_bytes
        self._kind = kind
        password = urlsplit(self._url).password
        self._password = unquote(password) if password else None
        self._timeout = timeout
        self._name = name
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._gate = ConnectGate(f"RabbitMQ {self._where}", log)
        self._known_exchanges: set[str] = {""}  # the default exchange always exists
        self._closed = False

    def _reason(self, exc: BaseException) -> str:
        return error_text(exc, [self._password])

    def _entry(self, intent: Intent) -> Publish:
        """What to publish for ``intent``; raises ``PermanentError`` for a bad payload."""
        raise NotImplementedError

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        entries: list[Publish | PermanentError] = []
        for intent in intents:
            try:
                entries.append(self._entry(intent))
            except PermanentError as exc:
                entries.append(exc)
        return await self._publish_many(entries)

    def _unroutable(self, exchange: str, routing_key: str) -> str:
        """Why a mandatory message came back (a subclass may say it in its own terms)."""
        return (
            f"RabbitMQ returned the message as unroutable: no queue bound to exchange "
            f"{exchange!r} for routing key {routing_key!r}"
        )

    async def _publish_many(
        self, entries: Sequence[Publish | PermanentError]
    ) -> list[BaseException | None]:
        """Publish every ``Publish`` in order on the shared channel, then wait for all the
        confirms at once; an entry that is already an error stays that error. The timeout
        covers the whole batch."""
        results: list[BaseException | _Pending | None] = [
            entry if isinstance(entry, PermanentError) else _PENDING for entry in entries
        ]
        todo = [(i, e) for i, e in enumerate(entries) if isinstance(e, Publish)]

        async def publish(i: int, exchange: AbstractExchange, entry: Publish) -> None:
            try:
                await exchange.publish(entry.message, entry.routing_key, mandatory=entry.mandatory)
            except Exception as exc:
                results[i] = self._failure(exc, exchange.name, entry.routing_key)
            else:
                results[i] = None

        exchanges: dict[str, AbstractExchange | BaseException] = {}
        with anyio.move_on_after(self._timeout):
            try:
                connection, channel = await self._ready()
                limit = self._size_limit(connection)
                for _, entry in todo:
                    if entry.exchange not in exchanges:
                        exchanges[entry.exchange] = await self._checked_exchange(
                            connection, channel, entry.exchange
                        )
            except Exception as exc:
                for i, entry in todo:
                    results[i] = copy_error(self._failure(exc, entry.exchange, entry.routing_key))
                todo = []
            jobs = []
            for i, entry in todo:
                exchange = exchanges[entry.exchange]
                if isinstance(exchange, BaseException):
                    results[i] = copy_error(exchange)
                elif (too_big := self._too_big(limit, entry)) is not None:
                    results[i] = too_big
                else:
                    jobs.append((i, exchange, entry))
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

    def _too_big(self, limit: SizeLimit, entry: Publish) -> PermanentError | None:
        """A body over the broker's max_message_size: the broker would close the shared
        channel over it, failing every publish in flight."""
        try:
            limit.check(
                f"{self._kind} message body to {entry.exchange or '(default exchange)'!r}",
                len(entry.message.body),
            )
        except PermanentError as exc:
            return exc
        return None

    def _size_limit(self, connection: AbstractConnection) -> SizeLimit:
        """RabbitMQ does not announce max_message_size: the default of the broker's version
        stands in, unless --limits says otherwise."""
        default = rabbitmq_default(_server_version(connection))
        return SizeLimit(self._kind, self._max_bytes, default)

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
            return TransientError(self._unroutable(exchange_name, routing_key))
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
                raise TransientError("the sink is closed")
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
