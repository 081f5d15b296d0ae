"""An intent's payload -> the Kafka record it becomes (pure; no client library).

Two shapes, told apart by their fields:

* explicit: ``{"topic", "key"?, "value"?, "headers"?}``;
* a Debezium outbox row: ``{"aggregatetype", "aggregateid"?, "type"?, "payload"?, "id"?,
  "headers"?}``, routed as Debezium's outbox event router does by default.

Every record carries the intent id (with ``--message-id-prefix``) in the ``outbox-message-id``
header, the same on every retry, and the intent's W3C trace context, if any.
"""

from __future__ import annotations

import re
from typing import Any, Literal, NamedTuple

import orjson

from worker.errors import PermanentError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context

__all__ = [
    "DEBEZIUM_TOPIC",
    "ID_HEADER",
    "KEY_ENCODINGS",
    "KeyEncoding",
    "Record",
    "Router",
]

ID_HEADER = "outbox-message-id"
DEBEZIUM_TOPIC = "outbox.event.${routedByValue}"  # Debezium's route.topic.replacement
PLACEHOLDER = "${routedByValue}"
KeyEncoding = Literal["string", "json", "json-schema"]
KEY_ENCODINGS: tuple[KeyEncoding, ...] = ("string", "json", "json-schema")

_EXPLICIT = frozenset({"topic", "key", "value", "headers"})
_DEBEZIUM = frozenset({"aggregatetype", "aggregateid", "type", "payload", "id", "headers"})
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Kafka accepts as a topic name
_NO_KEY = object()  # "key" absent: the ordering key, if any
# The per-record bytes librdkafka adds to key, value and headers when it checks a record
# against message.max.bytes (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD).
_RECORD_OVERHEAD = 36


class Record(NamedTuple):  # a tuple: built for every intent, at tens of thousands a second
    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone
    headers: list[tuple[str, bytes | None]]

    @property
    def size(self) -> int:
        """What librdkafka compares with message.max.bytes: key, value, headers and the
        record's framing."""
        size = _RECORD_OVERHEAD + len(self.key or b"") + len(self.value or b"")
        for name, value in self.headers:
            encoded = len(name.encode())
            size += _varint(encoded) + encoded + _varint(len(value) if value else -1)
            size += len(value or b"")
        return size


def _varint(n: int) -> int:
    """Bytes of ``n`` as a zig-zag varint (the lengths in a record's headers)."""
    n = (n << 1) ^ (n >> 63)
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _bytes(value: Any) -> bytes:
    """A string as its UTF-8 bytes, any other JSON as JSON."""
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


def _headers(
    raw: object, reserved: tuple[str, ...], intent: Intent
) -> list[tuple[str, bytes | None]]:
    """The payload's headers, with the intent's trace context (which replaces any
    traceparent/tracestate of the payload's)."""
    if raw is None and not intent.trace_context:
        return []
    if raw is not None and not isinstance(raw, dict):
        raise PermanentError("kafka 'headers' must be an object of name -> string")
    headers: list[tuple[str, bytes | None]] = []
    for name, value in with_trace_context(raw or {}, intent).items():
        if not name:
            raise PermanentError("kafka header names must not be empty")
        if name in reserved:
            raise PermanentError(f"kafka header {name!r} is set by the worker")
        if value is not None and not isinstance(value, str):
            raise PermanentError(f"kafka header {name!r} must be a string (or null)")
        headers.append((name, None if value is None else value.encode()))
    return headers


def _topic(topic: object) -> str:
    if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic) or topic in (".", ".."):
        shown = repr(topic)[:80]
        raise PermanentError(
            f"kafka topic {shown} is not a valid topic name: 1 to 249 letters, digits, . _ -"
        )
    return topic


def encode_key(key: str | int, encoding: KeyEncoding) -> bytes:
    """An aggregate id as the key converter of a Debezium set-up wrote it: Kafka Connect's
    StringConverter (``string``), or its JsonConverter without schemas (``json``) or with
    them (``json-schema``, the converter's default: an envelope with the key's schema)."""
    if encoding == "string":
        return str(key).encode()
    if encoding == "json":
        return orjson.dumps(key)
    kind = "string" if isinstance(key, str) else "int64"
    return orjson.dumps({"schema": {"type": kind, "optional": False}, "payload": key})


class Router:
    """Builds the record for each intent, as the operator configured the kind."""

    def __init__(
        self,
        *,
        id_prefix: str = "",
        debezium_topic: str = DEBEZIUM_TOPIC,
        key_encoding: KeyEncoding = "string",
    ) -> None:
        self._id_prefix = id_prefix
        self._debezium_topic = debezium_topic
        self._key_encoding = key_encoding
        self._topics: set[str] = set()  # names already found valid

    def _topic(self, topic: object) -> str:
        if isinstance(topic, str) and topic in self._topics:
            return topic
        checked = _topic(topic)
        if len(self._topics) >= 10_000:  # a bound for payloads that name ever new topics
            self._topics.clear()
        self._topics.add(checked)
        return checked

    def record(self, intent: Intent) -> Record:
        """Validate the payload -> the record. A payload that can never be sent is a
        ``PermanentError`` (the intent is dead with the reason)."""
        payload = intent.payload
        if not isinstance(payload, dict):
            raise PermanentError(
                f"kafka payload must be a JSON object, got {type(payload).__name__}"
            )
        message_id = f"{self._id_prefix}{intent.id}"
        if "topic" in payload:
            return self._explicit(intent, payload, message_id)
        if "aggregatetype" in payload:
            return self._debezium(intent, payload, message_id)
        raise PermanentError(
            "kafka payload needs 'topic' (a record) or 'aggregatetype' (a Debezium outbox row)"
        )

    def _explicit(self, intent: Intent, payload: dict[str, Any], message_id: str) -> Record:
        _unknown(payload, _EXPLICIT, "a record (with 'topic')")
        topic = self._topic(payload["topic"])
        raw_key = payload.get("key", _NO_KEY)
        if raw_key is _NO_KEY:
            key = None if intent.ordering_key is None else intent.ordering_key.encode()
        else:
            key = None if raw_key is None else _bytes(raw_key)
        value = payload.get("value")
        headers = _headers(payload.get("headers"), (ID_HEADER,), intent)
        headers.append((ID_HEADER, message_id.encode()))
        return Record(topic, key, None if value is None else _bytes(value), headers)

    def _debezium(self, intent: Intent, payload: dict[str, Any], message_id: str) -> Record:
        _unknown(payload, _DEBEZIUM, "a Debezium outbox row (with 'aggregatetype')")
        aggregate_type = payload["aggregatetype"]
        if not isinstance(aggregate_type, str) or not aggregate_type:
            raise PermanentError("kafka 'aggregatetype' must be a non-empty string")
        topic = self._topic(self._debezium_topic.replace(PLACEHOLDER, aggregate_type))
        aggregate_id = payload.get("aggregateid")
        if aggregate_id is not None and (
            isinstance(aggregate_id, bool) or not isinstance(aggregate_id, str | int)
        ):
            raise PermanentError("kafka 'aggregateid' must be a string or an integer (or null)")
        key = None if aggregate_id is None else encode_key(aggregate_id, self._key_encoding)
        event_id = payload.get("id")
        event_type = payload.get("type")
        for name, field in (("id", event_id), ("type", event_type)):
            if field is not None and not isinstance(field, str):
                raise PermanentError(f"kafka '{name}' must be a string")
        headers = _headers(payload.get("headers"), ("id", "eventType", ID_HEADER), intent)
        headers.append(("id", (event_id or message_id).encode()))
        if event_type is not None:
            headers.append(("eventType", event_type.encode()))
        headers.append((ID_HEADER, message_id.encode()))
        body = payload.get("payload")
        return Record(topic, key, None if body is None else _bytes(body), headers)


def _unknown(payload: dict[str, Any], fields: frozenset[str], shape: str) -> None:
    if payload.keys() <= fields:
        return
    unknown = sorted(str(k) for k in payload if k not in fields)
    if unknown:
        fields_ = ", ".join(unknown)
        raise PermanentError(f"kafka payload for {shape} has unknown field(s): {fields_}")
