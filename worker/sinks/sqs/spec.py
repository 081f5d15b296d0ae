"""The ``sqs`` kind's spec (the sink: worker/sinks/sqs/sink.py): on with --sqs; credentials,
region and endpoint come from the standard AWS settings, so it has no start-up line."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.sqs.sink import SqsSink

    return SqsSink(
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        concurrency=ctx.concurrency,
        max_bytes=ctx.max_bytes,
    )


SPEC = SinkSpec(
    kinds=("sqs",),
    options=(
        SinkOption(
            "--sqs",
            "OUTBOX_SQS",
            "turn on the sqs kind (Amazon SQS); credentials, region and endpoint come from the "
            "standard AWS settings (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL_SQS, ...)",
            default=False,
            switch=True,
        ),
    ),
    build=_build,
    extra="sqs",
    timeout=10.0,
)
