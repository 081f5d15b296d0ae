"""The ``rabbitmq`` kind: publish to an exchange with publisher confirms (aio-pika).

Payload::

    {"exchange": "orders", "routing_key": "order.created", "body": {...any JSON...},
     "headers": {"tenant": "acme"}, "type": "OrderCreated", "mandatory": true}

The message is persistent (delivery mode 2), ``application/json``, and its ``message_id``
is the intent id (with ``--message-id-prefix``), the same on every retry, so a consumer can
drop a duplicate; the intent's W3C trace context, if any, is in its headers (``traceparent``,
``tracestate``). The intent is sent only once the broker has confirmed the message. A nack,
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

import re

import aio_pika
import orjson

from worker.errors import PermanentError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context
from worker.sinks.amqp import AmqpPublisher, Publish, parse_amqp_url

__all__ = ["RabbitMQSink", "build_message", "parse_amqp_url"]

_FIELDS = frozenset({"exchange", "routing_key", "body", "headers", "type", "mandatory"})
_MAX_SHORTSTR = 255  # AMQP short strings: exchange names, routing keys, type
_EXCHANGE_RE = re.compile(r"^[A-Za-z0-9_.:-]*$")  # what RabbitMQ accepts as a name


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
        headers=dict(with_trace_context(headers, intent)),
    )
    return exchange, routing_key, message, mandatory


class RabbitMQSink(AmqpPublisher):
    """One connection and one confirming channel per worker (:class:`AmqpPublisher`)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        id_prefix: str = "",
        name: str = "outbox-worker",
        max_bytes: int | None = None,
    ) -> None:
        super().__init__(url, timeout=timeout, name=name, max_bytes=max_bytes)
        self._id_prefix = id_prefix

    def __repr__(self) -> str:
        return f"RabbitMQSink({self._where})"

    def _entry(self, intent: Intent) -> Publish:
        return Publish(*build_message(intent, self._id_prefix))
