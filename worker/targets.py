"""At start-up: where each kind's intents go, and whether those servers answer.

One log line per configured target, never with a password or token ("where did my email
go?" has an answer in the first lines of the log), then a quick TCP connect to each server,
all at once and bounded, that never delays or prevents the start: a server that does not
answer gets one warning line, and its intents are retried until it does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

import anyio

from worker.logs import one_line
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.sinks.email import parse_smtp_url
from worker.sinks.extras import UnavailableSink
from worker.sinks.handlers import HandlerSink
from worker.sinks.limits import LimitedSink

__all__ = ["CHECK_TIMEOUT", "Endpoint", "Target", "check_targets", "describe", "log_targets"]

log = logging.getLogger("outbox.targets")

CHECK_TIMEOUT = 3.0  # seconds for one TCP connect; the check runs beside the relay

_DEFAULT_SMTP_URL = next(f.default for f in fields(Settings) if f.name == "smtp_url")
_TLS_WORDS = {
    "opportunistic": "STARTTLS if offered",
    "starttls": "starttls",
    "none": "no TLS",
    "implicit": "TLS",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    shown: str  # the server as the log names it: scheme, user, host, port; never a secret


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # or several, comma-separated
    text: str
    endpoints: tuple[Endpoint, ...] = ()
    hint: str = ""  # added to the "cannot reach" warning


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _shown(scheme: str, user: str | None, host: str, port: int, path: str = "") -> str:
    return f"{scheme}://{f'{user}@' if user else ''}{_host(host)}:{port}{path}"


def _email(settings: Settings) -> Target:
    config = parse_smtp_url(settings.smtp_url)
    scheme = "smtps" if config.tls == "implicit" else "smtp"
    where = _shown(scheme, config.username, config.host, config.port)
    text = f"{where} ({_TLS_WORDS[config.tls]}), from {settings.mail_from}"
    hint = ""
    if settings.smtp_url == _DEFAULT_SMTP_URL:
        text = f"no --smtp-url: sending to {text}"
        hint = "; set --smtp-url (OUTBOX_SMTP_URL)"
    return Target("email", text, (Endpoint(config.host, config.port, where),), hint)


def _webhook(settings: Settings) -> Target:
    hosts = settings.webhook_allow_hosts
    text = "the URL in each payload, " + (f"hosts allowed: {hosts}" if hosts else "any host")
    text += (
        ", private addresses allowed"
        if settings.webhook_allow_private
        else ", private and loopback addresses refused"
    )
    if settings.webhook_secret:
        text += ", signed (Outbox-Signature)"
    return Target("webhook", text)


_DEFAULT_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}


def _broker(kind: str, url: str, what: str = "") -> Target:
    """A broker at one URL (RabbitMQ, Redis): scheme, user, host, port and path; no password."""
    parts = urlsplit(url.strip())
    host, port = parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    where = _shown(parts.scheme, parts.username, host, port, parts.path)
    return Target(kind, where + what, (Endpoint(host, port, where),))


def _nats(url: str) -> Target:
    endpoints = []
    for item in url.split(","):
        parts = urlsplit(item.strip())
        # nats://TOKEN@host: a user name without a password is a token, a secret.
        user = parts.username if parts.password else ("***" if parts.username else None)
        host, port = parts.hostname or "", parts.port or 4222
        endpoints.append(Endpoint(host, port, _shown(parts.scheme, user, host, port)))
    return Target("nats", ", ".join(e.shown for e in endpoints) + " (JetStream)", tuple(endpoints))


def _unwrapped(sink: Sink) -> Sink:
    return sink.sink if isinstance(sink, LimitedSink) else sink


def describe(settings: Settings, sinks: Mapping[str, Sink]) -> list[Target]:
    """Every kind this worker delivers and where to; URLs and parsing were checked when the
    sinks were built."""
    plain = {kind: _unwrapped(sink) for kind, sink in sinks.items()}
    handled = sorted(kind for kind, sink in plain.items() if isinstance(sink, HandlerSink))
    builtins = {  # kind: (configured, its target)
        "email": (True, lambda: _email(settings)),
        "webhook": (True, lambda: _webhook(settings)),
        "rabbitmq": (
            settings.rabbitmq_url is not None,
            lambda: _broker("rabbitmq", settings.rabbitmq_url or ""),
        ),
        "nats": (settings.nats_url is not None, lambda: _nats(settings.nats_url or "")),
        "sidekiq": (
            settings.sidekiq_redis_url is not None,
            lambda: _broker("sidekiq", settings.sidekiq_redis_url or "", " (Sidekiq's Redis)"),
        ),
        "celery": (
            settings.celery_broker_url is not None,
            lambda: _broker("celery", settings.celery_broker_url or "", " (Celery's broker)"),
        ),
    }
    targets: list[Target] = []
    off: list[str] = []
    for kind, (configured, target) in builtins.items():
        sink = plain.get(kind)
        if kind in handled or sink is None:
            continue
        if not configured:
            off.append(kind)
        elif isinstance(sink, UnavailableSink):  # its extra is not installed
            targets.append(Target(kind, f"unavailable: {sink.reason}"))
        else:
            targets.append(target())
    if handled:
        targets.append(Target(", ".join(handled), f"your handlers ({settings.handlers})"))
    if off:
        targets.append(
            Target(", ".join(off), "not configured in this worker (such intents end dead)")
        )
    return targets


def log_targets(targets: Sequence[Target]) -> None:
    for target in targets:
        log.info("%s: %s", target.kind, target.text)


async def check_targets(targets: Sequence[Target], timeout: float | None = None) -> None:
    """One TCP connect to every server at once, each within ``timeout`` (``CHECK_TIMEOUT``);
    a warning for each one that does not answer. Returns when all are done; never raises
    for an unreachable server."""
    timeout = CHECK_TIMEOUT if timeout is None else timeout
    async with anyio.create_task_group() as tg:
        for target in targets:
            for endpoint in target.endpoints:
                tg.start_soon(_probe, target, endpoint, timeout)


async def _probe(target: Target, endpoint: Endpoint, timeout: float) -> None:
    try:
        with anyio.fail_after(timeout):
            stream = await anyio.connect_tcp(endpoint.host, endpoint.port)
        await stream.aclose()
    except TimeoutError:
        why = f"no answer within {timeout:g}s"
    except OSError as exc:
        why = _why(exc)
    else:
        log.debug("%s: %s answers", target.kind, endpoint.shown)
        return
    log.warning(
        "%s: cannot reach %s (%s); its intents are retried until it answers%s",
        target.kind,
        endpoint.shown,
        why,
        target.hint,
    )


def _why(exc: OSError) -> str:
    """ "Connection refused" rather than anyio's "All connection attempts failed" (the
    attempts, one per address, are its cause)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        exc = cause
    return os.strerror(exc.errno) if exc.errno else one_line(exc)
