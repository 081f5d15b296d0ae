"""The ``sidekiq`` kind's spec (the sink: worker/sinks/sidekiq/sink.py): on with
--sidekiq-redis-url."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec, url_target


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.sidekiq.sink import SidekiqSink

    return SidekiqSink(
        ctx.options["sidekiq_redis_url"],
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
    )


SPEC = SinkSpec(
    kinds=("sidekiq",),
    options=(
        SinkOption(
            "--sidekiq-redis-url",
            "OUTBOX_SIDEKIQ_REDIS_URL",
            "Sidekiq's Redis for the sidekiq kind: redis[s]://[:pass@]host[:port][/db]",
            secret="url",
        ),
    ),
    build=_build,
    extra="sidekiq",
    describe=lambda values: url_target(
        "sidekiq", values["sidekiq_redis_url"], " (Sidekiq's Redis)"
    ),
    timeout=10.0,
)
