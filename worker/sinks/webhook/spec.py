"""The ``webhook`` kind's spec (the sink: worker/sinks/webhook/sink.py). Always on: its URL comes
with each intent; the flags sign requests and widen or narrow where they may go."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec, Target, Values


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.webhook.sink import WebhookSink, parse_allow_hosts

    return WebhookSink(
        secret=ctx.options["webhook_secret"],
        allow_hosts=parse_allow_hosts(ctx.options["webhook_allow_hosts"]),
        allow_private=ctx.options["webhook_allow_private"],
        timeout=ctx.timeout,
        max_connections=ctx.concurrency,
        max_retry_after=ctx.max_retry_after,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
    )


def _configured(values: Values) -> bool:
    # An empty allow-list is no allow-list: it does not turn anything on.
    return (
        values["webhook_secret"] is not None
        or bool(values["webhook_allow_hosts"])
        or values["webhook_allow_private"]
    )


def _describe(values: Values) -> Target:
    hosts = values["webhook_allow_hosts"]
    text = "the URL in each payload, " + (f"hosts allowed: {hosts}" if hosts else "any host")
    text += (
        ", private addresses allowed"
        if values["webhook_allow_private"]
        else ", private and loopback addresses refused"
    )
    if values["webhook_secret"]:
        text += ", signed (Outbox-Signature)"
    return Target("webhook", text)


SPEC = SinkSpec(
    kinds=("webhook",),
    options=(
        SinkOption(
            "--webhook-secret",
            "OUTBOX_WEBHOOK_SECRET",
            "key for the Outbox-Signature (HMAC-SHA256) of webhook requests; prefer the "
            "environment variable, flags show in ps",
            secret="text",
        ),
        SinkOption(
            "--webhook-allow-hosts",
            "OUTBOX_WEBHOOK_ALLOW_HOSTS",
            "comma-separated hosts webhooks may call (*.example.com for subdomains); unset: "
            "any host",
        ),
        SinkOption(
            "--webhook-allow-private",
            "OUTBOX_WEBHOOK_ALLOW_PRIVATE",
            "let webhooks call loopback, private and link-local addresses (refused by "
            "default; a host named exactly in --webhook-allow-hosts is allowed without this)",
            default=False,
            switch=True,
        ),
    ),
    build=_build,
    extra="webhook",
    always_on=True,
    configured=_configured,
    describe=_describe,
    timeout=30.0,
)
