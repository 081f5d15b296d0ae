"""The ``celery`` kind: a task for unmodified Celery workers, in Celery's message protocol
v2, on the broker they consume (``--celery-broker-url``): RabbitMQ (``amqp://``, with
publisher confirms) or Redis (``redis://``, kombu's list layout).

message.py builds the message (the payload's checks, the headers, the derived task id);
amqp.py and redis.py put it on the broker. Only the transport the URL names is imported,
so each needs only its own client library (both are in the ``celery`` extra). spec.py
declares the kind and its flag to the registry.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.errors import ConfigError
from worker.sinks.base import Sink

__all__ = ["celery_sink"]


def celery_sink(
    url: str, *, timeout: float, id_prefix: str = "", max_bytes: int | None = None
) -> Sink:
    """The sink for the broker ``url`` names; ``pyamqp://`` (Celery's name for its AMQP
    client) is ``amqp://``. Raises ``ConfigError`` for another scheme, ``ImportError`` when
    the transport's client library is missing."""
    url = url.strip()
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme == "pyamqp":
        url, scheme = "amqp" + url[len("pyamqp") :], "amqp"
    if scheme in ("amqp", "amqps"):
        from worker.sinks.celery.amqp import CeleryAmqpSink

        return CeleryAmqpSink(url, timeout=timeout, id_prefix=id_prefix, max_bytes=max_bytes)
    if scheme in ("redis", "rediss"):
        from worker.sinks.celery.redis import CeleryRedisSink

        return CeleryRedisSink(url, timeout=timeout, id_prefix=id_prefix, max_bytes=max_bytes)
    raise ConfigError(
        "--celery-broker-url must start with amqp://, amqps://, pyamqp://, redis:// or rediss://"
    )
