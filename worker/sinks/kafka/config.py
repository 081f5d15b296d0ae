"""The kafka kind's settings, without the client library: the brokers of ``--kafka-url``,
the librdkafka properties of ``--kafka-config KEY=VALUE``, which of those are secrets, and
the producer configuration the sink runs with (ours, then the operator's on top)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from worker.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "BadValue",
    "config_entry",
    "parse_kafka_url",
    "producer_config",
]

DEFAULT_PORT = 9092
# Properties whose value is (or holds) a credential: never logged, never in an error.
_SECRET_KEY_RE = re.compile(r"password|secret|jaas|token|oauthbearer\.config|\.pem$", re.I)
_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]*", re.I)
# Set by the sink from its own flags; the operator sets them there, not with --kafka-config.
_OURS = {
    "bootstrap.servers": "--kafka-url",
    "metadata.broker.list": "--kafka-url",
}
# Functions, not strings: confluent-kafka's callbacks are the sink's own.
_CALLBACKS = frozenset(
    {"error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_delivery", "logger", "dr_cb"}
)


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A flag's value that does not convert, in words of our own: argparse prints an
    ArgumentTypeError's message as it is (it would quote the text of any other error, and
    this text may hold a password); from a variable, it is a ValueError like any other."""


def parse_kafka_url(url: str) -> list[tuple[str, int]]:
    """``kafka://host[:port][,host[:port]...]`` (each may repeat ``kafka://``) -> the
    bootstrap brokers. Credentials belong in --kafka-config, so none are accepted here."""
    brokers: list[tuple[str, int]] = []
    items = [item.strip() for item in url.strip().split(",")]
    for n, item in enumerate(items):
        if n and "://" not in item:
            item = f"kafka://{item}"
        try:
            parts = urlsplit(item)
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"--kafka-url: broker {n + 1} is not host[:port]") from None
        if parts.scheme != "kafka":
            raise ConfigError(
                "--kafka-url must start with kafka:// (TLS and SASL are set with --kafka-config "
                "security.protocol=...)"
            )
        if parts.username or parts.password:
            raise ConfigError(
                "--kafka-url takes no credentials: set sasl.username and sasl.password with "
                "--kafka-config (or OUTBOX_KAFKA_CONFIG)"
            )
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"--kafka-url: broker {n + 1} is not host[:port]")
        brokers.append((parts.hostname, port))
    return brokers


def bootstrap_servers(brokers: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in brokers)


def config_entry(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value); the error never repeats the text (it may hold a
    password)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.fullmatch(key):
        raise BadValue("expected KEY=VALUE, a librdkafka property such as security.protocol=SSL")
    return key, value


def is_secret(key: str) -> bool:
    return bool(_SECRET_KEY_RE.search(key))


def shown_config(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The operator's properties as a log line may show them: secrets masked."""
    return {key: "***" if is_secret(key) else value for key, value in entries}


def producer_config(
    brokers: Sequence[tuple[str, int]],
    entries: Iterable[tuple[str, str]],
    *,
    timeout: float,
    client_id: str = "outbox-worker",
) -> dict[str, str]:
    """The producer's librdkafka configuration: an idempotent producer (acks=all), Java's
    partitioner, no topic auto-creation, every delivery report within ``timeout`` seconds
    (the relay's per-delivery timeout, which must not fire first); then the operator's
    properties, which may change any of these but the brokers and the report deadline."""
    # The reports come by message.timeout.ms (librdkafka scans for expired records about
    # once a second): well before the relay gives up on the batch, so that an outcome is
    # always a report, never a cancellation.
    deadline_ms = max(int(timeout * 900) - 1000, int(timeout * 500), 1)
    config: dict[str, str] = {
        "bootstrap.servers": bootstrap_servers(brokers),
        "client.id": client_id,
        "enable.idempotence": "true",
        "acks": "all",
        "partitioner": "murmur2_random",  # Java's (and Debezium's) partition for a key
        "allow.auto.create.topics": "false",
        # The sink flushes each batch once it is produced (producer.py): linger only lets a
        # batch's records gather into one request meanwhile.
        "linger.ms": "5",
        "message.timeout.ms": str(deadline_ms),
        # A topic missing from the metadata fails with UNKNOWN_TOPIC_OR_PART after this,
        # rather than with a timeout that says nothing about the topic.
        "topic.metadata.propagation.max.ms": str(max(min(deadline_ms // 2, 30_000), 1)),
    }
    for key, value in entries:
        if key in _OURS:
            raise ConfigError(f"--kafka-config {key}: set the brokers with {_OURS[key]}")
        if key in _CALLBACKS:
            raise ConfigError(f"--kafka-config {key}: a callback the sink sets itself")
        config[key] = value
    _check_deadline(config, timeout)
    return config


def _check_deadline(config: Mapping[str, str], timeout: float) -> None:
    """A report later than the delivery timeout would come after the relay retried the
    intent: a second record for sure, instead of an outcome."""
    for key in ("message.timeout.ms", "delivery.timeout.ms"):
        value = config.get(key)
        if value is None:
            continue
        try:
            ms = int(value)
        except ValueError:
            raise ConfigError(f"--kafka-config {key}: expected milliseconds") from None
        if ms <= 0 or ms >= timeout * 1000:
            raise ConfigError(
                f"--kafka-config {key}={ms}: must be above 0 and below the delivery timeout "
                f"({timeout:g}s, --delivery-timeout or --limits kafka:timeout), so that every "
                "record's outcome comes before the relay gives up on it"
            )
