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

import anyio

from worker.logs import one_line
from worker.settings import Settings
from worker.sinks import registry
from worker.sinks.base import Sink
from worker.sinks.handlers import HandlerSink
from worker.sinks.limits import LimitedSink
from worker.sinks.spec import Endpoint, Target

__all__ = ["CHECK_TIMEOUT", "Endpoint", "Target", "check_targets", "describe", "log_targets"]

log = logging.getLogger("outbox.targets")

CHECK_TIMEOUT = 3.0  # seconds for one TCP connect; the check runs beside the relay


def _unwrapped(sink: Sink) -> Sink:
    return sink.sink if isinstance(sink, LimitedSink) else sink


def describe(settings: Settings, sinks: Mapping[str, Sink]) -> list[Target]:
    """Every kind this worker delivers and where to, as each sink's spec names it; URLs and
    parsing were checked when the sinks were built."""
    plain = {kind: _unwrapped(sink) for kind, sink in sinks.items()}
    handled = sorted(kind for kind, sink in plain.items() if isinstance(sink, HandlerSink))
    targets: list[Target] = []
    off: list[str] = []
    for spec in registry.specs():
        if spec.describe is None:
            continue
        values = registry.option_values(spec, settings)
        kinds = [kind for kind in spec.kinds if kind not in handled and kind in plain]
        if not kinds:
            continue
        missing = [s.reason for k in kinds if isinstance(s := plain[k], registry.UnavailableSink)]
        if not (spec.always_on or spec.is_configured(values)):
            off.extend(kinds)
        elif missing:  # its extra is not installed
            targets.append(Target(", ".join(kinds), f"unavailable: {missing[0]}"))
        else:
            targets.append(spec.describe(values))
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
