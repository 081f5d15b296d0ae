"""Handlers for tests that run the worker as a subprocess.

Use with `--handlers tests.sample_handlers:handlers`.
"""

from __future__ import annotations

import os
import signal

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


@handlers.register("boom")
async def boom(intent: Intent) -> None:
    """A handler with a bug: raises on every attempt (an unknown exception is transient)."""
    raise RuntimeError(f"handler bug on intent {intent.id}")


@handlers.register("crash")
async def crash(_intent: Intent) -> None:
    """Poison that takes its worker down: the process dies at once, as by the OOM killer."""
    os.kill(os.getpid(), signal.SIGKILL)
