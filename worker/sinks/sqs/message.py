"""The ``sqs`` kind's payload -> one ``SendMessageBatch`` entry, checked as SQS checks it. Pure.

Payload::

    {"queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
     "body": <a string, sent as is, or any other JSON, sent serialised>,
     "attributes": {"tenant": "acme", "priority": 5}, "delay_seconds": 0,
     "group_id": "order-42"}

Only ``queue_url`` and ``body`` are required. A FIFO queue (its name ends in ``.fifo``) gets
``MessageGroupId`` = ``group_id`` if given, else the intent's ``ordering_key`` (an intent for a
FIFO queue with neither is dead), and ``MessageDeduplicationId`` = ``<prefix><intent id>``;
``delay_seconds`` is refused there (SQS only takes a per-queue delay on FIFO queues). Every
message carries the same ``<prefix><intent id>`` in the String attribute
``outbox_message_id``, and the intent's W3C trace context in the String attributes
``traceparent`` and ``tracestate`` (where OpenTelemetry's SQS instrumentations read it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context

__all__ = ["ID_ATTRIBUTE", "SqsMessage", "build_message", "check_id_prefix", "is_fifo"]

ID_ATTRIBUTE = "outbox_message_id"
_FIELDS = frozenset({"queue_url", "body", "attributes", "delay_seconds", "group_id"})
_QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
# MessageGroupId and MessageDeduplicationId: 1-128 of a-z, A-Z, 0-9 and ASCII punctuation.
_GROUP_RE = re.compile(r"""^[A-Za-z0-9!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$""")
# An attribute name: letters, digits, _ - . ; no leading/trailing or double period.
_ATTRIBUTE_RE = re.compile(r"^(?!\.)(?!.*\.\.)[A-Za-z0-9_.-]{1,256}(?<!\.)$")
# What SQS accepts in a body or String value (#x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD and up).
_BAD_CHAR_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MAX_ATTRIBUTES = 10
_MAX_DELAY = 900


@dataclass(frozen=True)
class SqsMessage:
    """A checked message: its queue, its batch entry (without ``Id``) and its size as SQS
    counts it (body + each attribute's name, type and value, in bytes)."""

    queue_url: str
    entry: dict[str, Any]
    size: int


def is_fifo(queue_url: str) -> bool:
    return queue_url.endswith(".fifo")


def check_id_prefix(prefix: str) -> None:
    """``<prefix><intent id>`` must make a valid MessageDeduplicationId."""
    if prefix and not (_GROUP_RE.match(prefix) and len(prefix) <= 100):
        raise ConfigError(
            "--message-id-prefix must be up to 100 ASCII letters, digits or punctuation for "
            "the sqs kind (it starts each MessageDeduplicationId)"
        )


def _fail(message: str) -> PermanentError:
    return PermanentError(f"sqs {message}")


def _check_queue_url(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise _fail("payload needs 'queue_url', a non-empty string")
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise _fail(f"'queue_url' {raw[:80]!r} cannot be parsed") from None
    name = parts.path.rpartition("/")[2]
    name = name.removesuffix(".fifo")
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or not _QUEUE_NAME_RE.match(name)
        or len(parts.path.rpartition("/")[2]) > 80
    ):
        raise _fail(
            f"'queue_url' {raw[:120]!r} is not a queue URL such as "
            "https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (NAME: up to 80 of A-Z a-z 0-9 _ -, "
            "plus .fifo for a FIFO queue)"
        )
    return raw


def _check_body(raw: object) -> str:
    body = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    if not body:
        raise _fail("'body' must not be empty")
    if _BAD_CHAR_RE.search(body):
        raise _fail("'body' holds characters SQS does not accept (control characters)")
    return body


def _check_attributes(raw: object) -> dict[str, str | int | float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail("'attributes' must be an object of name -> string or number")
    attributes: dict[str, str | int | float] = {}
    for name, value in raw.items():
        if not _ATTRIBUTE_RE.match(name) or name.lower().startswith(("aws.", "amazon.")):
            raise _fail(
                f"attribute name {name[:60]!r} is not valid: up to 256 of A-Z a-z 0-9 _ - ., "
                "not starting with AWS. or Amazon."
            )
        if name == ID_ATTRIBUTE:
            raise _fail(f"attribute {ID_ATTRIBUTE!r} is set by the worker")
        ok = isinstance(value, str) and value and not _BAD_CHAR_RE.search(value)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok or number):
            raise _fail(f"attribute {name!r} must be a non-empty string or a number")
        attributes[name] = value
    return attributes


def _message_attributes(values: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """SQS's MessageAttributes for ``values``, and the bytes they count towards the limit."""
    if len(values) > _MAX_ATTRIBUTES:
        raise _fail(
            f"message would have {len(values)} attributes, SQS takes {_MAX_ATTRIBUTES} "
            f"({ID_ATTRIBUTE} and the trace context count among them)"
        )
    out: dict[str, Any] = {}
    size = 0
    for name, value in values.items():
        kind = "String" if isinstance(value, str) else "Number"
        text = value if isinstance(value, str) else repr(value)
        out[name] = {"DataType": kind, "StringValue": text}
        size += len(name.encode()) + len(kind) + len(text.encode())
    return out, size


def _group_id(payload: dict[str, Any], intent: Intent, fifo: bool) -> str | None:
    group = payload.get("group_id")
    if group is None and fifo:
        group = intent.ordering_key
        if group is None:
            raise _fail(
                "FIFO queue needs a message group: give the intent an ordering_key, or the "
                "payload a 'group_id'"
            )
    if group is not None and not (isinstance(group, str) and _GROUP_RE.match(group)):
        raise _fail(
            f"message group {str(group)[:60]!r} (from the "
            f"{'group_id' if 'group_id' in payload else 'ordering_key'}) is not valid: 1-128 "
            "ASCII letters, digits or punctuation; set a 'group_id' that is"
        )
    return group


def build_message(intent: Intent, id_prefix: str = "") -> SqsMessage:
    """Validate the payload -> the message to send. Raises ``PermanentError``."""
    payload = intent.payload
    if not isinstance(payload, dict):
        raise _fail(f"payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise _fail("payload has unknown field(s): " + ", ".join(unknown))
    queue_url = _check_queue_url(payload.get("queue_url"))
    fifo = is_fifo(queue_url)
    if "body" not in payload:
        raise _fail("payload needs 'body': a string, or any JSON to send serialised")
    body = _check_body(payload["body"])
    message_id = f"{id_prefix}{intent.id}"
    values = dict(with_trace_context(_check_attributes(payload.get("attributes")), intent))
    values[ID_ATTRIBUTE] = message_id
    attributes, attributes_size = _message_attributes(values)
    entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": attributes}
    delay = payload.get("delay_seconds")
    if delay is not None:
        if fifo:
            raise _fail(
                "'delay_seconds' is not allowed for a FIFO queue (SQS takes only the "
                "queue's own DelaySeconds there); use run_at to delay the intent"
            )
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= _MAX_DELAY:
            raise _fail(f"'delay_seconds' must be a whole number from 0 to {_MAX_DELAY}")
        entry["DelaySeconds"] = delay
    group = _group_id(payload, intent, fifo)
    if group is not None:
        entry["MessageGroupId"] = group
    if fifo:
        entry["MessageDeduplicationId"] = message_id
    return SqsMessage(queue_url, entry, len(body.encode()) + attributes_size)
