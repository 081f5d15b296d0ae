"""The ``nats`` kind's spec (the sink: worker/sinks/nats/sink.py): on with --nats-url, one or
more JetStream servers."""

from __future__ import annotations

from urllib.parse import urlsplit

from worker.sinks.base import Sink
from worker.sinks.spec import Endpoint, SinkContext, SinkOption, SinkSpec, Target, Values, shown_url


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.nats.sink import NatsSink

    return NatsSink(
        ctx.options["nats_url"],
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
    )


def _describe(values: Values) -> Target:
    endpoints = []
    for item in values["nats_url"].split(","):
        parts = urlsplit(item.strip())
        # nats://TOKEN@host: a user name without a password is a token, a secret.
        user = parts.username if parts.password else ("***" if parts.username else None)
        host, port = parts.hostname or "", parts.port or 4222
        endpoints.append(Endpoint(host, port, shown_url(parts.scheme, user, host, port)))
    return Target("nats", ", ".join(e.shown for e in endpoints) + " (JetStream)", tuple(endpoints))


SPEC = SinkSpec(
    kinds=("nats",),
    options=(
        SinkOption(
            "--nats-url",
            "OUTBOX_NATS_URL",
            "server(s) for the nats kind (JetStream): nats://[user:pass@]host[:port][,...]",
            secret="urls",
        ),
    ),
    build=_build,
    extra="nats",
    describe=_describe,
    timeout=10.0,
)
