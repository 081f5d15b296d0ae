"""Handlers for tests that run the worker as a subprocess (`--handlers tests.sample_handlers:handlers`)."""

from __future__ import annotations

import anyio

from worker import Handlers, Intent, PermanentError

handlers = Handlers()


@handlers.register("noop")
async def noop(_intent: Intent) -> None:
    pass


@handlers.register("slow")
async def slow(intent: Intent) -> None:
    """Takes payload['seconds'] seconds."""
    await anyio.sleep(float(intent.payload.get("seconds", 1)))


@handlers.register("reject")
async def reject(intent: Intent) -> None:
    raise PermanentError(f"rejected intent {intent.id}")
