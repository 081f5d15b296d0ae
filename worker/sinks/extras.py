"""The built-in sinks that need a pip extra (webhook, rabbitmq, nats, sidekiq, celery, sqs):
build each one, or say exactly what is missing.

A kind that is configured (its URL, secret or allow-list is set) but whose extra is not
installed stops the worker at start-up. A kind that is not configured, or whose extra is
missing, still gets a sink: one that turns its intents dead with the reason, instead of the
generic "unknown kind".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from worker.distribution import pip_install
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.sinks.limits import KindLimits

__all__ = ["UnavailableSink", "extra_sinks", "missing_extra"]

# The sinks' own timeouts, when neither --limits nor --delivery-timeout is shorter.
_DEFAULT_TIMEOUT = {
    "webhook": 30.0,
    "rabbitmq": 30.0,
    "nats": 10.0,
    "sidekiq": 10.0,
    "celery": 30.0,
    "sqs": 10.0,
}


class UnavailableSink:
    """Stands in for a sink that cannot run in this process: every intent is dead with
    ``reason`` (``outbox-worker retry-dead --kind K`` brings them back once fixed)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnavailableSink({self.reason!r})"

    async def deliver(self, intent: Intent) -> None:
        raise PermanentError(self.reason)

    async def aclose(self) -> None:
        pass


def missing_extra(kind: str, exc: ImportError) -> str:
    return (
        f"the {kind} kind needs the '{kind}' extra ({exc.name or 'a package'} is not "
        f"installed): {pip_install(kind)}"
    )


@dataclass(frozen=True)
class _Builtin:
    kind: str
    configured: bool
    how: str  # how to configure it, for the "not configured" reason
    build: Callable[[float, int | None], Sink]  # (timeout, max_bytes); may raise ImportError


def _timeout(kind: str, settings: Settings, limits: dict[str, KindLimits]) -> float:
    per_kind = limits[kind].timeout if kind in limits else None
    return min(_DEFAULT_TIMEOUT[kind], settings.delivery_timeout, per_kind or math.inf)


def _webhook(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.webhook import WebhookSink, parse_allow_hosts

        return WebhookSink(
            secret=settings.webhook_secret,
            allow_hosts=parse_allow_hosts(settings.webhook_allow_hosts),
            allow_private=settings.webhook_allow_private,
            timeout=timeout,
            max_connections=settings.concurrency,
            max_retry_after=settings.backoff_max,
            id_prefix=settings.message_id_prefix,
            max_bytes=max_bytes,
        )

    return build


def _rabbitmq(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.rabbitmq import RabbitMQSink

        assert settings.rabbitmq_url is not None
        return RabbitMQSink(
            settings.rabbitmq_url,
            timeout=timeout,
            id_prefix=settings.message_id_prefix,
            max_bytes=max_bytes,
        )

    return build


def _nats(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.nats import NatsSink

        assert settings.nats_url is not None
        return NatsSink(
            settings.nats_url,
            timeout=timeout,
            id_prefix=settings.message_id_prefix,
            max_bytes=max_bytes,
        )

    return build


def _sidekiq(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.sidekiq import SidekiqSink

        assert settings.sidekiq_redis_url is not None
        return SidekiqSink(
            settings.sidekiq_redis_url,
            timeout=timeout,
            id_prefix=settings.message_id_prefix,
            max_bytes=max_bytes,
        )

    return build


def _celery(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.celery import celery_sink

        assert settings.celery_broker_url is not None
        return celery_sink(
            settings.celery_broker_url,
            timeout=timeout,
            id_prefix=settings.message_id_prefix,
            max_bytes=max_bytes,
        )

    return build


def _sqs(settings: Settings) -> Callable[[float, int | None], Sink]:
    def build(timeout: float, max_bytes: int | None) -> Sink:
        from worker.sinks.sqs import SqsSink

        return SqsSink(
            timeout=timeout,
            id_prefix=settings.message_id_prefix,
            concurrency=settings.concurrency,
            max_bytes=max_bytes,
        )

    return build


def extra_sinks(settings: Settings, limits: dict[str, KindLimits]) -> dict[str, Sink]:
    builtins = [
        # A webhook needs no URL of its own (it comes with each intent): always on.
        _Builtin("webhook", True, "", _webhook(settings)),
        _Builtin(
            "rabbitmq",
            settings.rabbitmq_url is not None,
            "--rabbitmq-url or OUTBOX_RABBITMQ_URL",
            _rabbitmq(settings),
        ),
        _Builtin(
            "nats", settings.nats_url is not None, "--nats-url or OUTBOX_NATS_URL", _nats(settings)
        ),
        _Builtin(
            "sidekiq",
            settings.sidekiq_redis_url is not None,
            "--sidekiq-redis-url or OUTBOX_SIDEKIQ_REDIS_URL",
            _sidekiq(settings),
        ),
        _Builtin(
            "celery",
            settings.celery_broker_url is not None,
            "--celery-broker-url or OUTBOX_CELERY_BROKER_URL",
            _celery(settings),
        ),
        _Builtin("sqs", settings.sqs, "--sqs or OUTBOX_SQS=1", _sqs(settings)),
    ]
    explicit = {
        "webhook": settings.webhook_secret is not None
        or bool(settings.webhook_allow_hosts)
        or settings.webhook_allow_private,
        "rabbitmq": settings.rabbitmq_url is not None,
        "nats": settings.nats_url is not None,
        "sidekiq": settings.sidekiq_redis_url is not None,
        "celery": settings.celery_broker_url is not None,
        "sqs": settings.sqs,
    }
    sinks: dict[str, Sink] = {}
    for builtin in builtins:
        if not builtin.configured:
            sinks[builtin.kind] = UnavailableSink(
                f"the {builtin.kind} kind is not configured in this worker: start it with "
                f"{builtin.how}"
            )
            continue
        try:
            per_kind = limits.get(builtin.kind)
            max_bytes = per_kind.max_bytes if per_kind else None
            sinks[builtin.kind] = builtin.build(_timeout(builtin.kind, settings, limits), max_bytes)
        except ImportError as exc:
            if exc.name and exc.name.startswith("worker"):
                raise  # our own bug, not a missing extra
            reason = missing_extra(builtin.kind, exc)
            if explicit[builtin.kind]:
                raise ConfigError(reason) from None
            sinks[builtin.kind] = UnavailableSink(reason)
    return sinks
