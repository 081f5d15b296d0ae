"""Every sink this worker knows: the built-in specs, then those other distributions declare in
the entry-point group ``pg_outbox_relay.sinks`` (the contract: worker/sinks/spec.py).

Each configured kind gets its sink. A kind that is not configured, or whose extra is missing,
still gets one: an ``UnavailableSink`` that turns its intents dead with the reason, instead of
the generic "unknown kind". A kind that is configured but whose extra is missing stops the
start.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from worker import logs
from worker.distribution import NAME
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.sinks.limits import KindLimits
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "UnavailableSink",
    "build_sinks",
    "builtin_specs",
    "missing_extra",
    "option_values",
    "sink_options",
    "specs",
]

ENTRY_POINT_GROUP = "pg_outbox_relay.sinks"

# The built-in sinks: the module that declares each one's SPEC. A new one is one line here.
_BUILTIN = (
    "worker.sinks.email.spec",
    "worker.sinks.webhook.spec",
    "worker.sinks.rabbitmq.spec",
    "worker.sinks.nats.spec",
    "worker.sinks.sidekiq.spec",
    "worker.sinks.celery.spec",
    "worker.sinks.sqs.spec",
    "worker.sinks.kafka.spec",
)

_KIND_RE = re.compile(r"[A-Za-z0-9_.-]+")  # what --limits accepts as a kind


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


def missing_extra(kind: str, spec: SinkSpec, exc: ImportError) -> str:
    package = spec.distribution or NAME
    install = f"pip install '{package}[{spec.extra}]'" if spec.extra else f"pip install {package}"
    needs = f"the '{spec.extra}' extra" if spec.extra else package
    return f"the {kind} kind needs {needs} ({exc.name or 'a package'} is not installed): {install}"


def _plugin(entry: EntryPoint) -> SinkSpec:
    where = f"sink plugin {entry.name!r} ({entry.value})"
    try:
        spec = entry.load()
    except Exception as exc:  # the plugin's import error as one line, not a traceback
        raise ConfigError(f"{where} cannot be loaded: {logs.one_line(exc)}") from None
    if not isinstance(spec, SinkSpec):
        raise ConfigError(f"{where} is a {type(spec).__name__}, not a worker.sinks.spec.SinkSpec")
    dist = entry.dist.name if entry.dist is not None else None
    return replace(spec, distribution=spec.distribution or dist)


def _check(loaded: list[tuple[str, SinkSpec]]) -> None:
    """One owner for every kind, option name, flag and variable."""
    owners: dict[str, str] = {}
    for where, spec in loaded:
        if not spec.kinds:
            raise ConfigError(f"{where} declares no kind")
        names = [
            *(f"kind {k!r}" for k in spec.kinds),
            *(f"flag {o.flag}" for o in spec.options),
            *(f"variable {o.env}" for o in spec.options),
        ]
        for kind in spec.kinds:
            if not _KIND_RE.fullmatch(kind):
                raise ConfigError(f"{where}: kind {kind!r} is not letters, digits, _ . -")
        for option in spec.options:
            if not option.flag.startswith("--"):
                raise ConfigError(f"{where}: flag {option.flag!r} does not start with --")
        for name in names:
            if name in owners:
                raise ConfigError(f"{where} declares {name}, which the {owners[name]} has already")
            owners[name] = where


def builtin_specs() -> tuple[SinkSpec, ...]:
    """The specs of the sinks this distribution ships, without any plugin's."""
    return tuple(importlib.import_module(module).SPEC for module in _BUILTIN)


@functools.cache
def specs() -> tuple[SinkSpec, ...]:
    """The built-in specs, then the installed plugins' (once per process)."""
    loaded = [(f"built-in {', '.join(spec.kinds)} sink", spec) for spec in builtin_specs()]
    plugins = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    loaded += [(f"sink plugin {e.name!r} ({e.value})", _plugin(e)) for e in plugins]
    _check(loaded)
    return tuple(spec for _, spec in loaded)


def sink_options() -> list[SinkOption]:
    """Every sink's flags, in the order of the specs."""
    return [option for spec in specs() for option in spec.options]


def option_values(spec: SinkSpec, settings: Settings) -> dict[str, Any]:
    """The spec's options as configured, its defaults for those that are not."""
    return {o.name: settings.sink_options.get(o.name, o.default) for o in spec.options}


def _context(
    spec: SinkSpec, kind: str, values: Mapping[str, Any], settings: Settings, limit: KindLimits
) -> SinkContext:
    timeout = min(spec.timeout or math.inf, settings.delivery_timeout, limit.timeout or math.inf)
    return SinkContext(
        kind=kind,
        options=values,
        concurrency=settings.concurrency,
        timeout=timeout,
        max_bytes=limit.max_bytes,
        id_prefix=settings.message_id_prefix,
        max_retry_after=settings.backoff_max,
    )


def _unknown_options(settings: Settings) -> Iterable[str]:
    known = {option.name for option in sink_options()}
    return sorted(set(settings.sink_options) - known)


def build_sinks(settings: Settings, limits: Mapping[str, KindLimits]) -> dict[str, Sink]:
    """A sink for every kind of every spec, in the order of the specs."""
    unknown = list(_unknown_options(settings))
    if unknown:
        raise ConfigError(f"no sink has the option(s) {', '.join(unknown)}")
    sinks: dict[str, Sink] = {}
    for spec in specs():
        values = option_values(spec, settings)
        explicit = spec.is_configured(values)
        for kind in spec.kinds:
            if not (explicit or spec.always_on):
                sinks[kind] = UnavailableSink(
                    f"the {kind} kind is not configured in this worker: start it with "
                    f"{spec.how_to_configure()}"
                )
                continue
            ctx = _context(spec, kind, values, settings, limits.get(kind, KindLimits()))
            try:
                sinks[kind] = spec.build(ctx)
            except ImportError as exc:
                if exc.name and exc.name.split(".")[0] == "worker":
                    raise  # our own bug, not a missing extra
                reason = missing_extra(kind, spec, exc)
                if explicit:
                    raise ConfigError(reason) from None
                sinks[kind] = UnavailableSink(reason)
    return sinks
