"""The ``rabbitmq`` kind's spec (the sink: worker/sinks/rabbitmq/sink.py): on with
--rabbitmq-url."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec, url_target


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.rabbitmq.sink import RabbitMQSink

    return RabbitMQSink(
        ctx.options["rabbitmq_url"],
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
    )


SPEC = SinkSpec(
    kinds=("rabbitmq",),
    options=(
        SinkOption(
            "--rabbitmq-url",
            "OUTBOX_RABBITMQ_URL",
            "broker for the rabbitmq kind: amqp[s]://user:pass@host[:port][/vhost]",
            secret="url",
        ),
    ),
    build=_build,
    extra="rabbitmq",
    describe=lambda values: url_target("rabbitmq", values["rabbitmq_url"]),
    timeout=30.0,
)
