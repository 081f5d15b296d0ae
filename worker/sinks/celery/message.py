"""Celery's task message, protocol v2, for a ``celery`` intent (pure).

Payload::

    {"task": "myapp.tasks.send_welcome", "args": [42], "kwargs": {}, "queue": "celery",
     "countdown": 60 | "eta": "2026-12-04T09:00:00+00:00", "expires": 3600 | "<ISO 8601>"}

The message is what ``send_welcome.apply_async(...)`` would send (celery/app/amqp.py,
``as_task_v2``): the headers ``lang``, ``task``, ``id``, ``root_id`` (= id), ``argsrepr``,
... , and the JSON body ``[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]``.
``countdown`` and a number of seconds in ``expires`` count from the intent's ``created_at``
(the producer's commit), not from the push: a push delayed by an outage or a retry does not
postpone the task, and every attempt sends the same message.

The task id is ``uuid5(TASK_ID_NAMESPACE, f"{--message-id-prefix}{intent id}")``: the same
on every retry, so a task can recognise a duplicate push (``self.request.id``). The intent's
W3C trace context, if any, goes into the headers (``traceparent``, ``tracestate``), which
Celery's OpenTelemetry instrumentation reads as the task request's.
"""

from __future__ import annotations

import contextlib
import math
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import orjson

from worker.errors import PermanentError
from worker.intent import Intent
from worker.observe.tracing import with_trace_context

__all__ = ["TASK_ID_NAMESPACE", "CeleryTask", "build_task", "task_id"]

TASK_ID_NAMESPACE = uuid.UUID("f9cae757-3d31-418a-a090-f8b8b95f7e1b")

_FIELDS = frozenset({"task", "args", "kwargs", "queue", "eta", "countdown", "expires"})
_MAX_QUEUE = 255  # an AMQP routing key (short string)
_REPR_MAX = 1024  # Celery's argsrepr_maxsize and kwargsrepr_maxsize
# The embedded workflow: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True, slots=True)
class CeleryTask:
    """One task message, for any transport."""

    id: str
    queue: str
    headers: dict[str, Any]
    body: bytes  # JSON: [args, kwargs, embed]
    content_type: str = "application/json"
    content_encoding: str = "utf-8"

    @property
    def properties(self) -> dict[str, Any]:
        """The message properties Celery sets (no result backend: empty reply_to)."""
        return {"correlation_id": self.id, "reply_to": ""}


def task_id(intent_id: int, id_prefix: str = "") -> str:
    return str(uuid.uuid5(TASK_ID_NAMESPACE, f"{id_prefix}{intent_id}"))


@cache
def origin() -> str:
    """Who sent it, as Celery's ``origin`` header says (``gen<pid>@host`` for a client)."""
    return f"outbox-worker@{socket.gethostname()}"


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _after(what: str, value: object, created_at: datetime) -> str:
    """``value`` seconds after the intent was created, as ISO 8601."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PermanentError(f"celery '{what}' must be a number of seconds")
    try:
        return (created_at + timedelta(seconds=value)).isoformat()
    except OverflowError:
        raise PermanentError(f"celery '{what}' is out of range: {value!r}") from None


def _instant(what: str, value: object, created_at: datetime) -> str:
    """An ISO 8601 date-time with an offset; for ``expires`` also seconds after creation."""
    if what == "expires" and not isinstance(value, str):
        return _after(what, value, created_at)
    when = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(value)
    if when is None or when.tzinfo is None:
        raise PermanentError(
            f"celery '{what}' must be an ISO 8601 date-time with a UTC offset "
            f"(e.g. 2026-12-04T09:00:00+00:00), got {str(value)[:40]!r}"
        )
    return when.isoformat()


def _check(payload: Any) -> tuple[str, list[Any], dict[str, Any], str]:
    if not isinstance(payload, dict):
        raise PermanentError(f"celery payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise PermanentError("celery payload has unknown field(s): " + ", ".join(unknown))
    name = payload.get("task")
    if not isinstance(name, str) or not name.strip():
        raise PermanentError("celery payload needs 'task', the task's name (a non-empty string)")
    args = payload.get("args", [])
    if not isinstance(args, list):
        raise PermanentError("celery 'args' must be a list")
    kwargs = payload.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise PermanentError("celery 'kwargs' must be an object")
    queue = payload.get("queue", "celery")
    if not isinstance(queue, str) or not queue or len(queue.encode()) > _MAX_QUEUE:
        raise PermanentError(
            f"celery 'queue' must be a non-empty string of at most {_MAX_QUEUE} bytes"
        )
    if "eta" in payload and "countdown" in payload:
        raise PermanentError("celery payload has both 'eta' and 'countdown': give one")
    return name, args, kwargs, queue


def build_task(intent: Intent, id_prefix: str = "") -> CeleryTask:
    """Validate the payload -> the task message. Raises ``PermanentError``."""
    payload = intent.payload
    name, args, kwargs, queue = _check(payload)
    created = intent.created_at
    eta = None
    if "countdown" in payload:
        eta = _after("countdown", payload["countdown"], created)
    elif "eta" in payload:
        eta = _instant("eta", payload["eta"], created)
    expires = payload.get("expires")
    tid = task_id(intent.id, id_prefix)
    try:
        body = orjson.dumps([args, kwargs, _EMBED])
    except TypeError as exc:  # e.g. an integer beyond 64 bits
        raise PermanentError(f"celery args/kwargs cannot be encoded as JSON: {exc}") from None
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": tid,
        "shadow": None,
        "eta": eta,
        "expires": None if expires is None else _instant("expires", expires, created),
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": tid,
        "parent_id": None,
        "argsrepr": _short_repr(args),
        "kwargsrepr": _short_repr(kwargs),
        "origin": origin(),
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    return CeleryTask(tid, queue, dict(with_trace_context(headers, intent)), body)
