"""Handlers for tests that run the worker as a subprocess.

Use with `--handlers tests.sample_handlers:handlers`.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time

import anyio
import orjson

from worker import Handlers, Intent, PermanentError, TransientError

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


@handlers.register("block")
async def block(intent: Intent) -> None:
    """The classic mistake: a blocking call inside an async handler holds the event loop
    for payload['seconds'] seconds."""
    time.sleep(float(intent.payload.get("seconds", 1)))  # noqa: ASYNC251


@handlers.register("sleepy", threads=2)
def sleepy(intent: Intent) -> None:
    """Blocking calls in a plain function run in a thread: sleeps until the file
    payload['until'] exists (at most a minute), and the event loop keeps turning."""
    deadline = time.monotonic() + 60
    while not os.path.exists(intent.payload["until"]) and time.monotonic() < deadline:
        time.sleep(0.05)


@handlers.register("ordered")
async def ordered(intent: Intent) -> None:
    """Records every attempt in the file $OUTBOX_TEST_ATTEMPTS (one JSON line at its start,
    one at its end; O_APPEND, so processes can share the file), takes 0-3 ms, and fails its
    first attempt when the payload says ``fail_first``. tests/fault/test_ordering_faults.py
    reads the file back."""
    fd = _attempts_file()
    os.write(fd, orjson.dumps({"id": intent.id, "start": time.monotonic()}) + b"\n")
    ok = False
    try:
        await anyio.sleep(random.Random(intent.id * 7 + intent.attempts).uniform(0, 0.003))
        if intent.payload.get("fail_first") and intent.attempts == 1:
            raise TransientError("first attempt fails, as told")
        ok = True
    finally:
        os.write(fd, orjson.dumps({"id": intent.id, "end": time.monotonic(), "ok": ok}) + b"\n")


@functools.cache
def _attempts_file() -> int:
    return os.open(os.environ["OUTBOX_TEST_ATTEMPTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
