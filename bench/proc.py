"""The parent's handle on one worker process (bench/child.py) and on CPU accounting."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import orjson
import psutil
from anyio.streams.buffered import BufferedByteReceiveStream

from bench.sql import query

_MAX_LINE = 1 << 28  # the final line carries every handler start time
_REPO = Path(__file__).resolve().parent.parent


class ChildFailed(RuntimeError):
    pass


class WorkerProcess:
    def __init__(self, process: anyio.abc.Process, tag: str, log_path: Path) -> None:
        self.process = process
        self.tag = tag
        self.log_path = log_path
        assert process.stdout is not None and process.stdin is not None
        self._out = BufferedByteReceiveStream(process.stdout)
        self._in = process.stdin

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            with anyio.fail_after(timeout):
                line = await self._out.receive_until(b"\n", _MAX_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead, TimeoutError) as exc:
            raise ChildFailed(self._failure(f"no {event!r} from the worker ({exc!r})")) from None
        message: dict[str, Any] = orjson.loads(line)
        if message.get("event") != event:
            raise ChildFailed(self._failure(f"expected {event!r}, got {message!r}"))
        return message

    def _failure(self, what: str) -> str:
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        return f"{what}; worker log {self.log_path}:\n{tail}"

    async def _send(self, **cmd: Any) -> None:
        await self._in.send(orjson.dumps(cmd) + b"\n")

    async def go(self) -> dict[str, Any]:
        await self._send(cmd="go")
        return await self._expect("running", 30)

    async def wait_handled(self, count: int, timeout: float) -> float:
        """Monotonic time at which the ``count``-th handler finished."""
        await self._send(cmd="wait", count=count, timeout=timeout)
        reply = await self._expect("handled", timeout + 30)
        if reply["t"] is None:
            raise ChildFailed(
                self._failure(f"only {reply['count']} of {count} handled within {timeout:g}s")
            )
        return float(reply["t"])

    async def info(self) -> dict[str, Any]:
        await self._send(cmd="info")
        return await self._expect("info", 30)

    async def stop(self) -> dict[int, float]:
        """Stop the worker; the start time of each handler, by payload key."""
        await self._send(cmd="stop")
        reply = await self._expect("stopped", 60)
        await self.process.wait()
        return {int(k): float(t) for k, t in reply["starts"]}


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a process that must import ``worker`` and ``bench`` from ``tree``
    (run with ``cwd=tree`` too: ``python -m`` puts the working directory first)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *_pythonpath()])}


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


@contextlib.asynccontextmanager
async def worker_process(
    kind: str, log_dir: Path, *, tree: Path | None = None, **cfg: Any
) -> AsyncIterator[WorkerProcess]:
    """Start ``bench.child`` and wait until it is set up (but not yet working). ``tree`` is
    another checkout to run it from (its own ``bench/child.py`` and ``worker`` package)."""
    tag = cfg.setdefault("tag", f"bench-{kind}-{secrets.token_hex(3)}")
    cfg["kind"] = kind
    await anyio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{tag}.log"
    async with await anyio.open_file(log_path, "wb") as log_file:
        process = await anyio.open_process(
            [sys.executable, "-m", "bench.child", orjson.dumps(cfg).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file.wrapped,
            cwd=tree or _REPO,
            env=tree_env(tree) if tree else None,
        )
    handle = WorkerProcess(process, tag, log_path)
    try:
        await handle._expect("ready", 60)
        yield handle
    finally:
        if process.returncode is None:
            with anyio.CancelScope(shield=True):
                process.terminate()
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


# --- CPU ---------------------------------------------------------------------------------


def _cpu_seconds(pids: set[int]) -> dict[int, float]:
    seconds = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            seconds[pid] = t.user + t.system
    return seconds


@dataclass
class CpuSample:
    at: float
    worker: float
    server: dict[int, float]


class CpuMeter:
    """CPU of one worker process and of the PostgreSQL processes that serve it (its backends
    plus the server's own WAL writer, checkpointer, ...), not of other clients'.

    Backends are found by the worker's application_name, so the worker must be connected
    when ``start`` is called; a backend that ends between the samples is not counted.
    """

    def __init__(self, conn: asyncpg.Connection, worker: WorkerProcess) -> None:
        self._conn = conn
        self._worker = worker
        self._pids: set[int] = set()
        self._first: CpuSample | None = None

    async def _server_pids(self) -> set[int]:
        rows = await self._conn.fetch(query("backend_pids"), self._worker.tag)
        aux = await self._conn.fetch(query("aux_pids"))
        return {r["pid"] for r in rows} | {r["pid"] for r in aux}

    async def _sample(self) -> CpuSample:
        self._pids |= await self._server_pids()
        worker = _cpu_seconds({self._worker.pid}).get(self._worker.pid, 0.0)
        return CpuSample(time.monotonic(), worker, _cpu_seconds(self._pids))

    async def start(self) -> None:
        self._first = await self._sample()

    async def stop(self) -> dict[str, float]:
        """Percent of one core over the interval, {"worker_cpu": .., "pg_cpu": ..}, and the
        worker's CPU seconds ("worker_cpu_s")."""
        assert self._first is not None
        last = await self._sample()
        first = self._first
        wall = max(last.at - first.at, 1e-9)
        server = sum(t - first.server.get(pid, 0.0) for pid, t in last.server.items())
        return {
            "worker_cpu": 100 * (last.worker - first.worker) / wall,
            "pg_cpu": 100 * server / wall,
            "worker_cpu_s": last.worker - first.worker,
        }
