"""User handlers: plain async callables, one per kind, loaded from ``module:attribute``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from worker.errors import ConfigError
from worker.intent import Intent

Handler = Callable[[Intent], Awaitable[Any]]


class Handlers(Mapping[str, Handler]):
    """A registry to pass to ``--handlers``::

    handlers = Handlers()

    @handlers.register("sms")
    async def send_sms(intent: Intent) -> None: ...
    """

    def __init__(self) -> None:
        self._by_kind: dict[str, Handler] = {}

    def register(self, kind: str) -> Callable[[Handler], Handler]:
        def add(fn: Handler) -> Handler:
            if kind in self._by_kind:
                raise ValueError(f"a handler for kind {kind!r} is already registered")
            self._by_kind[kind] = fn
            return fn

        return add

    def __getitem__(self, kind: str) -> Handler:
        return self._by_kind[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_kind)

    def __len__(self) -> int:
        return len(self._by_kind)


class HandlerSink:
    """Adapts one user callable to the Sink protocol."""

    def __init__(self, fn: Handler) -> None:
        self._fn = fn

    async def deliver(self, intent: Intent) -> None:
        await self._fn(intent)

    async def aclose(self) -> None:
        pass


def load_handlers(spec: str) -> Mapping[str, Handler]:
    """``package.module:attribute`` -> a mapping of kind to async callable, checked."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"--handlers {spec!r}: expected MODULE:ATTRIBUTE, e.g. myapp.outbox:handlers"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # show the user's import error as one line, not a traceback
        raise ConfigError(f"--handlers {spec!r}: cannot import {module_name!r}: {exc}") from None
    try:
        handlers = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"--handlers {spec!r}: {module_name!r} has no attribute {attribute!r}"
        ) from None
    if not isinstance(handlers, Mapping):
        raise ConfigError(
            f"--handlers {spec!r}: expected a mapping of kind -> async callable, "
            f"got {type(handlers).__name__}"
        )
    for kind, fn in handlers.items():
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"--handlers {spec!r}: kind {kind!r} is not a non-empty string")
        # A coroutine function, or an object whose class defines `async def __call__`.
        call = fn if inspect.isroutine(fn) else type(fn).__call__
        if not inspect.iscoroutinefunction(call):
            raise ConfigError(
                f"--handlers {spec!r}: the handler for {kind!r} is not an async callable"
            )
    return handlers
