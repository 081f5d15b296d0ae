"""How big a message each sink may send, checked before any of its bytes are sent.

Each sink measures what it is about to put on the wire (the HTTP body, the MIME message,
the NATS payload with its headers, the AMQP body, the Redis value) and compares it with the
limit of the server it talks to: one the server announces (SMTP ``SIZE`` in the EHLO reply,
NATS ``max_payload`` in INFO), else the server's documented default, else a cap of ours.
``--limits KIND:max_bytes=SIZE`` sets that cap (and lowers an announced limit).

A message over its limit is a permanent failure: the intent ends ``dead`` with a reason that
names both sizes, and its neighbours in the batch go on. Sending it would fail anyway, and
on the broker kinds it would fail badly: RabbitMQ closes the whole channel over a message
larger than ``max_message_size`` and NATS closes the connection over one larger than
``max_payload``, failing every other message in flight on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.errors import ConfigError, PermanentError

__all__ = ["SizeLimit", "format_bytes", "parse_size"]

KIB, MIB, GIB = 1024, 1024**2, 1024**3
_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": KIB, "mib": MIB, "gib": GIB,
}  # fmt: skip
_SIZE_RE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z]*)")

# Our caps where the server announces nothing (docs/kinds/index.md, "Message size limits").
WEBHOOK_DEFAULT = 10 * MIB  # API gateways and load balancers commonly cap request bodies here
EMAIL_DEFAULT = 25 * MIB  # what the big mail providers accept, for a server without SIZE
REDIS_DEFAULT = 64 * MIB  # far below Redis's 512 MB per value; a job that size is a mistake
NATS_DEFAULT = MIB  # the server's default max_payload, until INFO says otherwise


def rabbitmq_default(version: str | None) -> int:
    """RabbitMQ's default ``max_message_size`` for the broker ``version`` (from the
    connection's server properties): 16 MiB since 4.0, 128 MiB in 3.8 to 3.13."""
    major = (version or "").split(".", 1)[0]
    return 16 * MIB if major.isdigit() and int(major) >= 4 else 128 * MIB


def format_bytes(n: int) -> str:
    """``20,971,520 bytes (20 MiB)``; small sizes without the unit in brackets."""
    if n < KIB:
        return f"{n:,} bytes"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.3g} {unit})"
    raise AssertionError  # unreachable


def parse_size(kind: str, text: str) -> int:
    """``max_bytes`` of ``--limits``: ``1048576``, ``512KiB``, ``20MB``, ``1GiB``..."""
    match = _SIZE_RE.fullmatch(text.strip().lower())
    if not match or match["unit"] not in _UNITS:
        raise ConfigError(
            f"--limits {kind}: max_bytes={text!r}: expected a size such as 1048576, 512KiB, "
            "20MB or 1GiB"
        )
    value = int(float(match["n"]) * _UNITS[match["unit"]])
    if value < 1:
        raise ConfigError(f"--limits {kind}: max_bytes must be at least 1 byte")
    return value


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """One sink's limit: ``cap`` from ``--limits KIND:max_bytes`` (None: not set) and the
    ``default`` used when neither the operator nor the server says otherwise."""

    kind: str
    cap: int | None
    default: int

    def check(self, what: str, size: int, announced: int | None = None, by: str = "") -> None:
        """Raise ``PermanentError`` when ``size`` bytes of ``what`` exceed the limit: the
        smaller of the cap and the limit the server ``announced`` (``by``: where it did),
        else the default."""
        limit, source = self.limit(announced, by)
        if size > limit:
            raise PermanentError(
                f"{what} of {format_bytes(size)} is larger than the limit of "
                f"{format_bytes(limit)}, {source}; nothing was sent"
            )

    def limit(self, announced: int | None = None, by: str = "") -> tuple[int, str]:
        """(bytes, where that number comes from)."""
        if self.cap is not None and (announced is None or self.cap <= announced):
            return self.cap, f"--limits {self.kind}:max_bytes"
        if announced is not None:
            return announced, by
        return (
            self.default,
            f"the {self.kind} default (--limits {self.kind}:max_bytes raises it)",
        )
