"""The `run` flags: each one's name, environment variable, converter and help, in one list
(worker/cli/arguments.py builds the parser from it; docs/reference/cli.md is generated from it).
The sinks' own flags come from their specs (worker/sinks/registry.py), after --handlers."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.errors import ConfigError
from worker.observe.http_server import host_port
from worker.sinks.spec import SinkOption

_T = TypeVar("_T")


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A value that does not convert. Its message says what was expected and what came;
    argparse prints it after the flag's name, settings_from after the variable's."""


def expecting(what: str) -> Callable[[Callable[[str], _T]], Callable[[str], _T]]:
    """Any ValueError of the converter becomes BadValue("expected WHAT, got 'TEXT'")."""

    def wrap(convert: Callable[[str], _T]) -> Callable[[str], _T]:
        @functools.wraps(convert)
        def checked(text: str) -> _T:
            try:
                return convert(text)
            except ValueError:
                shown = repr(text) if len(text) <= 40 else f"{text[:37]!r}..."
                raise BadValue(f"expected {what}, got {shown}") from None

        return checked

    return wrap


@expecting("a positive integer")
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


@expecting("a positive number")
def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


@expecting("a number, 0 or more")
def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


@expecting("a boolean (1/0, true/false, yes/no, on/off)")
def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


@expecting("a duration such as 30d, 12h, 90m or 600s")
def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``600s`` (or plain seconds) -> seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    return positive_float(number) * units[unit]


@expecting("a duration such as 24h, 7d, 90m or 600s, or forever")
def retention(text: str) -> float:
    """A ``duration``, or ``forever`` (math.inf): the rows are never deleted."""
    return math.inf if text == "forever" else duration(text)


def show_retention(seconds: float) -> str:
    """``retention``'s inverse for the help text: 86400.0 -> 24h, 604800.0 -> 7d."""
    if seconds == math.inf:
        return "forever"
    days = seconds >= 2 * 86400 and seconds % 86400 == 0
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and (days or unit != "d"):
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


@expecting("halt or continue")
def _on_dead(text: str) -> str:
    if text not in ("halt", "continue"):
        raise ValueError
    return text


@dataclass(frozen=True)
class Option:
    flag: str
    field: str
    env: str
    convert: Callable[[str], Any]
    help: str
    switch: bool = False  # a --flag with no value
    sink: bool = False  # a sink's own: its value goes to Settings.sink_options
    default: Any = None  # a sink's default (the others' are the Settings fields')
    repeat: bool = False  # may be given several times (a sink's; see SinkOption)


WORKER_OPTIONS = [
    Option(
        "--concurrency",
        "concurrency",
        "OUTBOX_CONCURRENCY",
        positive_int,
        "deliveries in flight at once in this process",
    ),
    Option(
        "--batch-size",
        "batch_size",
        "OUTBOX_BATCH_SIZE",
        positive_int,
        "most rows taken by one claim (never more than the idle slots)",
    ),
    Option(
        "--poll-interval",
        "poll_interval",
        "OUTBOX_POLL_INTERVAL",
        positive_float,
        "seconds between fallback polls (plus up to 20%% jitter)",
    ),
    Option(
        "--linger",
        "linger",
        "OUTBOX_LINGER",
        non_negative_float,
        "seconds a worker that has just drained the queue keeps claiming before it asks "
        "producers to notify it (0: never linger)",
    ),
    Option(
        "--lease",
        "lease",
        "OUTBOX_LEASE",
        positive_float,
        "seconds a claimed row stays ours without a heartbeat (which renews it every "
        "LEASE/3 seconds while it is delivered); then any worker may retake it",
    ),
    Option(
        "--grace",
        "grace",
        "OUTBOX_GRACE",
        positive_float,
        "on SIGTERM/SIGINT, seconds in-flight deliveries get to finish before they are "
        "cancelled and released",
    ),
    Option(
        "--max-attempts",
        "max_attempts",
        "OUTBOX_MAX_ATTEMPTS",
        positive_int,
        "attempts before an intent is dead (a row's own max_attempts wins)",
    ),
    Option(
        "--delivery-timeout",
        "delivery_timeout",
        "OUTBOX_DELIVERY_TIMEOUT",
        positive_float,
        "seconds one delivery may take; then it counts as a transient failure",
    ),
    Option(
        "--backoff-base",
        "backoff_base",
        "OUTBOX_BACKOFF_BASE",
        positive_float,
        "first retry delay in seconds; doubles each attempt, with jitter",
    ),
    Option(
        "--backoff-max",
        "backoff_max",
        "OUTBOX_BACKOFF_MAX",
        positive_float,
        "longest retry delay in seconds",
    ),
    Option(
        "--no-listen",
        "listen",
        "OUTBOX_NO_LISTEN",
        boolean,
        "poll only, no LISTEN (behind a pooler without --listen-dsn this is what happens)",
        switch=True,
    ),
    Option(
        "--pooled",
        "pooled",
        "OUTBOX_POOLED",
        boolean,
        "the DSN is a pooler's (PgBouncer, Supavisor, RDS Proxy): unnamed statements, settings "
        "per transaction; found by itself when the pooler refuses session settings",
        switch=True,
    ),
    Option(
        "--listen-dsn",
        "listen_dsn",
        "OUTBOX_LISTEN_DSN",
        str,
        "a direct connection (not through the pooler) for LISTEN and the idle flag; without "
        "it a pooled worker polls",
    ),
    Option(
        "--ping-interval",
        "ping_interval",
        "OUTBOX_PING_INTERVAL",
        positive_float,
        "seconds between health pings of the LISTEN connection",
    ),
    Option(
        "--ping-timeout",
        "ping_timeout",
        "OUTBOX_PING_TIMEOUT",
        positive_float,
        "seconds a ping may take before the LISTEN connection is declared dead",
    ),
    Option(
        "--handlers",
        "handlers",
        "OUTBOX_HANDLERS",
        str,
        "MODULE:ATTRIBUTE, a mapping of kind -> async handler(intent)",
    ),
    Option(
        "--message-id-prefix",
        "message_id_prefix",
        "OUTBOX_MESSAGE_ID_PREFIX",
        str,
        "prefix of the intent id in Idempotency-Key, AMQP message_id, Nats-Msg-Id, the Sidekiq "
        "jid and SQS's MessageDeduplicationId; set one per database when several outboxes "
        "publish to the same place",
    ),
    Option(
        "--limits",
        "limits",
        "OUTBOX_LIMITS",
        str,
        "per-kind limits, per process: 'KIND:concurrency=N,rate=N/s,timeout=S,max_bytes=SIZE;"
        "KIND:...', e.g. 'email:rate=10/s;webhook:concurrency=4,max_bytes=32MiB'",
    ),
    Option(
        "--ordering-on-dead",
        "ordering_on_dead",
        "OUTBOX_ORDERING_ON_DEAD",
        _on_dead,
        "when an intent with an ordering key ends dead: halt the key's later intents until "
        "an operator runs retry-dead or skip-dead, or continue with the next one",
    ),
    Option(
        "--retain-sent",
        "retain_sent",
        "OUTBOX_RETAIN_SENT",
        retention,
        "delete sent intents this long after they were sent (forever: keep them)",
    ),
    Option(
        "--retain-dead",
        "retain_dead",
        "OUTBOX_RETAIN_DEAD",
        retention,
        "delete dead intents this long after they were created, never one that halts its "
        "ordering key unless --ordering-on-dead continue (forever: keep them)",
    ),
    Option(
        "--http",
        "http",
        "OUTBOX_HTTP",
        expecting("a HOST:PORT such as 127.0.0.1:9187")(host_port),
        "serve /metrics (Prometheus), /healthz and /readyz on HOST:PORT, e.g. 127.0.0.1:9187 "
        "(needs the metrics extra; off by default)",
    ),
    Option(
        "--loop-block-warning",
        "loop_block_warning",
        "OUTBOX_LOOP_BLOCK_WARNING",
        non_negative_float,
        "warn when the event loop does not turn for this many seconds (a handler that "
        "blocks it), naming the intent; 0: don't watch",
    ),
    Option(
        "--migrate",
        "migrate",
        "OUTBOX_MIGRATE",
        boolean,
        "apply the schema before starting (idempotent)",
        switch=True,
    ),
]


def _from_spec(option: SinkOption) -> Option:
    convert = boolean if option.switch else option.convert
    return Option(
        option.flag,
        option.name,
        option.env,
        convert,
        option.help,
        switch=option.switch,
        sink=True,
        default=option.default,
        repeat=option.repeat,
    )


# Taken by the flags every command has (worker/cli/arguments.py) and their variables.
_COMMON_FIELDS = frozenset(
    {"dsn", "schema", "channel", "log_format", "verbose", "dashboard", "no_dashboard", "help"}
)
_COMMON_ENVS = frozenset({"DATABASE_URL", "OUTBOX_SCHEMA", "OUTBOX_CHANNEL", "OUTBOX_LOG_FORMAT"})


@functools.cache
def run_options() -> list[Option]:
    """The worker's flags, the sinks' after --handlers. Loads the sinks' specs (plugins too):
    a broken or clashing plugin is a ConfigError here."""
    from worker.sinks.registry import sink_options

    sinks = [_from_spec(option) for option in sink_options()]
    fields = _COMMON_FIELDS | {opt.field for opt in WORKER_OPTIONS}
    envs = _COMMON_ENVS | {opt.env for opt in WORKER_OPTIONS}
    for opt in sinks:
        if opt.field in fields or opt.env in envs:
            raise ConfigError(
                f"the sink option {opt.flag} ({opt.env}) clashes with a worker option"
            )
    at = next(i for i, opt in enumerate(WORKER_OPTIONS) if opt.field == "handlers") + 1
    return [*WORKER_OPTIONS[:at], *sinks, *WORKER_OPTIONS[at:]]
