"""Run-time configuration: one frozen dataclass, validated once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.errors import ConfigError

# Names we splice into SQL (always quoted too). Uppercase is allowed and used exactly;
# anything that would need creative quoting is refused up front with a clear message.
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently cut


def validate_name(what: str, name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use letters, digits and underscores, "
            "not starting with a digit"
        )
    if len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"invalid {what} {name[:20]!r}...: {len(name.encode())} bytes, "
            f"PostgreSQL allows at most {_MAX_IDENTIFIER_BYTES}"
        )
    return name


def validate_schema_name(name: str) -> str:
    validate_name("schema name", name)
    if name.startswith("pg_"):  # PostgreSQL refuses to create it (ReservedNameError)
        raise ConfigError(
            f"invalid schema name {name!r}: the prefix pg_ is reserved for system schemas"
        )
    return name


def default_channel(schema: str) -> str:
    """``SCHEMA_intent``; a schema name too long for that is a fine channel name itself
    (channels and schemas are separate namespaces)."""
    channel = f"{schema}_intent"
    return channel if len(channel.encode()) <= _MAX_IDENTIFIER_BYTES else schema


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: str | None = field(default=None, repr=False)  # may hold a password
    schema: str = "outbox"
    channel: str = "outbox_intent"
    concurrency: int = 8
    batch_size: int = 100
    poll_interval: float = 2.0
    linger: float = 0.001
    lease: float = 30.0
    grace: float = 15.0
    max_attempts: int = 10
    delivery_timeout: float = 60.0
    backoff_base: float = 2.0
    backoff_max: float = 3600.0
    listen: bool = True
    # Connections go through a pooler (PgBouncer, Supavisor, RDS Proxy): nothing may outlive
    # a transaction (worker/store/connection.py). Found by itself when the pooler says so.
    pooled: bool = False
    # A direct connection for LISTEN and the idle flag, when the DSN is a pooler's.
    listen_dsn: str | None = field(default=None, repr=False)  # may hold a password
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    handlers: str | None = None
    # Every sink's own options by name (--rabbitmq-url: "rabbitmq_url"), as given; a sink's
    # spec (worker/sinks/spec.py) has their defaults. repr=False: they hold secrets.
    sink_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    message_id_prefix: str = ""
    limits: str | None = None  # per-kind limits, parsed by worker.sinks.limits
    # What a dead intent does to the later intents of its ordering key: "halt" them until an
    # operator acts (retry-dead, skip-dead), or "continue" with the next one.
    ordering_on_dead: str = "halt"
    # Warn when the event loop does not turn for this many seconds (a handler blocking
    # it, worker/observe/loopwatch.py); 0: no watchdog.
    loop_block_warning: float = 1.0
    migrate: bool = False
    # Retention (worker/relay/retention.py): seconds a sent intent is kept after it was sent
    # and a dead one after it was created; math.inf keeps them forever ("forever").
    retain_sent: float = 86400.0  # 24 h: River's completed jobs, Solid Queue's 1 day
    retain_dead: float = 7 * 86400.0  # 7 d: River's discarded jobs, pg-boss
    # HOST:PORT of /metrics, /healthz, /readyz (worker/observe/http_server.py)
    http: str | None = None
    heartbeat: bool = True  # off only in tests that prove the fence

    def __post_init__(self) -> None:
        validate_schema_name(self.schema)
        validate_name("channel name", self.channel)
        # The lease has no tie to the LISTEN ping: the heartbeat renews it every lease/3
        # seconds, so any positive lease is kept alive while its delivery runs.
        for flag, value in (
            ("--lease", self.lease),
            ("--poll-interval", self.poll_interval),
            ("--delivery-timeout", self.delivery_timeout),
            ("--retain-sent", self.retain_sent),
            ("--retain-dead", self.retain_dead),
        ):
            if not value > 0:
                raise ConfigError(f"{flag} must be positive, got {value:g}")
        if self.linger < 0 or self.linger >= self.poll_interval:
            raise ConfigError(
                f"--linger ({self.linger:g} s) must be at least 0 and shorter than "
                f"--poll-interval ({self.poll_interval:g} s)"
            )
        if self.ordering_on_dead not in ("halt", "continue"):
            raise ConfigError(
                f"--ordering-on-dead must be halt or continue, got {self.ordering_on_dead!r}"
            )
