"""The ``celery`` kind's spec: on with --celery-broker-url (RabbitMQ or Redis)."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec, url_target


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.celery import celery_sink

    return celery_sink(
        ctx.options["celery_broker_url"],
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
    )


SPEC = SinkSpec(
    kinds=("celery",),
    options=(
        SinkOption(
            "--celery-broker-url",
            "OUTBOX_CELERY_BROKER_URL",
            "broker of the Celery workers, for the celery kind: amqp://user:pass@host[:port]/"
            "vhost or redis://[:pass@]host[:port]/db",
            secret="url",
        ),
    ),
    build=_build,
    extra="celery",
    describe=lambda values: url_target("celery", values["celery_broker_url"], " (Celery's broker)"),
    timeout=30.0,
)
