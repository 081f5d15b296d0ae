"""The ``celery`` kind on RabbitMQ: the task message published with confirms (aio-pika).

Published to the default exchange with the queue's name as the routing key: RabbitMQ binds
every queue to it, so the message reaches the queue whatever exchange and bindings the
Celery app declared for it (Celery's default is a direct exchange ``celery`` bound to the
queue ``celery``). ``mandatory``: while no queue of that name exists (no Celery worker has
declared it yet) the message comes back unroutable and the intent is retried, rather than
being dropped by the broker. We do not declare the queue ourselves: a declaration whose
arguments differ from the worker's (durable, quorum, max priority...) is refused, and the
worker is the one that knows them.
"""

from __future__ import annotations

import aio_pika

from worker.intent import Intent
from worker.sinks.amqp import AmqpPublisher, Publish
from worker.sinks.celery.message import build_task

__all__ = ["CeleryAmqpSink"]


class CeleryAmqpSink(AmqpPublisher):
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        id_prefix: str = "",
        name: str = "outbox-worker",
        max_bytes: int | None = None,
    ) -> None:
        super().__init__(
            url,
            timeout=timeout,
            name=name,
            flag="--celery-broker-url",
            kind="celery",
            max_bytes=max_bytes,
        )
        self._id_prefix = id_prefix

    def __repr__(self) -> str:
        return f"CeleryAmqpSink({self._where})"

    def _entry(self, intent: Intent) -> Publish:
        task = build_task(intent, self._id_prefix)
        message = aio_pika.Message(
            task.body,
            headers=task.headers,
            content_type=task.content_type,
            content_encoding=task.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **task.properties,
        )
        return Publish("", task.queue, message, mandatory=True)

    def _unroutable(self, exchange: str, routing_key: str) -> str:
        return (
            f"RabbitMQ has no queue {routing_key!r}: start a Celery worker that consumes it "
            "(it declares the queue); retried until then, up to the intent's max attempts"
        )
