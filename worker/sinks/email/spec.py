"""The ``email`` kind's spec: ``--smtp-url`` and ``--mail-from``, always on (a worker with
neither sends to the local SMTP server, and says so at start-up)."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.email.config import parse_smtp_url
from worker.sinks.spec import Endpoint, SinkContext, SinkOption, SinkSpec, Target, Values, shown_url

DEFAULT_SMTP_URL = "smtp://localhost:25"
_TLS_WORDS = {
    "opportunistic": "STARTTLS if offered",
    "starttls": "starttls",
    "none": "no TLS",
    "implicit": "TLS",
}


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.email.sink import EmailSink

    return EmailSink(
        parse_smtp_url(ctx.options["smtp_url"]),
        ctx.options["mail_from"],
        ctx.concurrency,
        max_bytes=ctx.max_bytes,
    )


def _describe(values: Values) -> Target:
    config = parse_smtp_url(values["smtp_url"])
    scheme = "smtps" if config.tls == "implicit" else "smtp"
    where = shown_url(scheme, config.username, config.host, config.port)
    text = f"{where} ({_TLS_WORDS[config.tls]}), from {values['mail_from']}"
    hint = ""
    if values["smtp_url"] == DEFAULT_SMTP_URL:
        text = f"no --smtp-url: sending to {text}"
        hint = "; set --smtp-url (OUTBOX_SMTP_URL)"
    return Target("email", text, (Endpoint(config.host, config.port, where),), hint)


SPEC = SinkSpec(
    kinds=("email",),
    options=(
        SinkOption(
            "--smtp-url",
            "OUTBOX_SMTP_URL",
            "SMTP server for the email kind: smtp[s]://[user:pass@]host[:port][?tls=starttls|"
            "none&cafile=PATH]",
            default=DEFAULT_SMTP_URL,
            secret="url",
        ),
        SinkOption(
            "--mail-from",
            "OUTBOX_MAIL_FROM",
            "sender address when a payload has no 'from'",
            default="outbox@localhost",
        ),
    ),
    build=_build,
    always_on=True,  # the SMTP server has a default; no extra to miss
    describe=_describe,
)
