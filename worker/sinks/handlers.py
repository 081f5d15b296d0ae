"""User handlers: plain async callables, one per kind, loaded from ``module:attribute``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from worker.errors import ConfigError
from worker.intent import Intent
from worker.sinks.threaded import Threaded

Handler = Callable[[Intent], Awaitable[Any]]
_Fn = TypeVar("_Fn", bound=Callable[[Intent], Any])
_PLAIN = (
    "is a plain function, which would block the event loop: make it async, or register "
    "it with threads=N to run it in threads"
)


class Handlers(Mapping[str, Handler]):
    """A registry to pass to ``--handlers``:

    handlers = Handlers()

    @handlers.register("sms")
    async def send_sms(intent: Intent) -> None: ...

    @handlers.register("invoice_pdf", threads=4)  # a plain function, run off the event loop
    def render_invoice(intent: Intent) -> None: ...
    """

    def __init__(self) -> None:
        self._by_kind: dict[str, Handler] = {}

    def register(self, kind: str, *, threads: int | None = None) -> Callable[[_Fn], _Fn]:
        """``threads=N``: ``fn`` is a plain function that may block; it runs in at most N
        threads of its own (worker/sinks/threaded.py)."""

        def add(fn: _Fn) -> _Fn:
            if kind in self._by_kind:
                raise ValueError(f"a handler for kind {kind!r} is already registered")
            if threads is None:
                if not _is_async(fn):
                    raise TypeError(f"the handler for {kind!r} {_PLAIN}")
                self._by_kind[kind] = fn
            elif _is_async(fn):
                raise TypeError(
                    f"the handler for {kind!r} is async: threads= is for plain functions"
                )
            else:
                self._by_kind[kind] = Threaded(fn, threads)
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
        if not _is_async(fn):
            what = _PLAIN if inspect.isroutine(fn) else "is not an async callable"
            raise ConfigError(f"--handlers {spec!r}: the handler for {kind!r} {what}")
    return handlers


def _is_async(fn: object) -> bool:
    """A coroutine function, or an object whose class defines `async def __call__`."""
    call = fn if inspect.isroutine(fn) else type(fn).__call__
    return inspect.iscoroutinefunction(call)
