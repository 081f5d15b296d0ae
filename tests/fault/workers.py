"""Run `outbox-worker` as a real subprocess and watch it: JSON log lines, signals, CPU time.

The worker's output is drained continuously by tasks on the test's event loop (a worker
blocked on a full pipe would look hung), parsed when it is JSON, and kept whole so that a
test can search every byte the process wrote (tracebacks included) for a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

REPO = Path(__file__).resolve().parents[2]
_WORKER_ID_RE = re.compile(r"^worker (\S+): \d+ delivery slots")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment minus anything that would configure the worker behind our back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_", "PG"))}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class LogLine:
    at: float  # time.monotonic() when the test read it
    stream: str  # "stdout" | "stderr"
    text: str
    record: dict[str, Any] | None  # the parsed JSON log record, if it was one

    @property
    def msg(self) -> str:
        return str(self.record.get("msg", "")) if self.record else self.text

    @property
    def level(self) -> str:
        return str(self.record.get("level", "")) if self.record else ""


class WorkerProcess:
    """One `python -m worker ...` process (the same entry point as `outbox-worker`)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "worker", *args]
        self.env = worker_env(env)
        self.lines: list[LogLine] = []
        self.started_at = 0.0
        self.worker_id: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> WorkerProcess:
        self._proc = await asyncio.create_subprocess_exec(
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
            cwd=REPO,
        )
        self.started_at = time.monotonic()
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._drain(self._proc.stdout, "stdout")),
            asyncio.create_task(self._drain(self._proc.stderr, "stderr")),
        ]
        return self

    async def aclose(self) -> None:
        """Kill it if it still runs; reap it; stop the readers."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)  # a paused process cannot die
                self._proc.kill()
        await self._proc.wait()
        for task in self._readers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=5)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def signal(self, signum: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)

    def kill(self) -> None:
        """kill -9: no handler runs, no outcome is written, nothing is released."""
        self.signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (GC pause, VM migration); its heartbeat stops."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    async def wait(self, timeout: float) -> int:
        """The exit code; raises TimeoutError (with the output's tail) if it does not exit."""
        assert self._proc is not None
        try:
            code = await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"worker did not exit within {timeout}s\n{self.tail()}") from None
        for task in self._readers:  # everything it wrote is read before we look at it
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=5)
        return code

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    # -- output ---------------------------------------------------------------------------

    @property
    def output(self) -> str:
        """Everything the process wrote, both streams, in the order the test read it."""
        return "\n".join(line.text for line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line.text for line in self.lines[-n:])

    def logged(self, needle: str, *, since: float = 0.0) -> list[LogLine]:
        return [line for line in self.lines if line.at >= since and needle in line.msg]

    async def wait_for_log(
        self,
        match: str | Callable[[LogLine], bool],
        *,
        since: float = 0.0,
        timeout: float = 20.0,
    ) -> LogLine:
        """The first line (read at or after ``since``) that contains / satisfies ``match``."""
        test = (lambda line: match in line.msg) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if line.at >= since and test(line):
                    return line
            seen = len(self.lines)
            if not self.running and all(t.done() for t in self._readers):
                raise AssertionError(
                    f"worker exited ({self.returncode}) without logging {match!r}\n{self.tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker never logged {match!r} in {timeout}s\n{self.tail()}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                # Bounded: the process may exit without another line.
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def ready(self, timeout: float = 30.0) -> str:
        """Wait for the relay's start-up line; returns the worker id it logged."""
        line = await self.wait_for_log(
            lambda ln: bool(_WORKER_ID_RE.match(ln.msg)), timeout=timeout
        )
        match = _WORKER_ID_RE.match(line.msg)
        assert match is not None
        self.worker_id = match.group(1)
        return self.worker_id

    async def _drain(self, stream: asyncio.StreamReader, name: str) -> None:
        while raw := await stream.readline():
            text = raw.decode(errors="replace").rstrip("\n")
            record = None
            if text.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(text)
            self.lines.append(LogLine(time.monotonic(), name, text, record))
            self._changed.set()
        self._changed.set()


def run_args(
    *,
    dsn: str,
    schema: str,
    smtp_url: str | None = None,
    concurrency: int = 8,
    poll_interval: float = 0.5,
    lease: float = 4.0,
    grace: float = 5.0,
    extra: Sequence[str] = (),
) -> list[str]:
    """`run` with settings tuned for tests: short poll, lease, backoff and pings."""
    args = [
        "run",
        "--dsn", dsn,
        "--schema", schema,
        "--log-format", "json",
        "--handlers", "tests.sample_handlers:handlers",
        "--mail-from", "outbox@example.com",
        "--concurrency", str(concurrency),
        "--poll-interval", str(poll_interval),
        "--lease", str(lease),
        "--grace", str(grace),
        "--ping-interval", "0.5",
        "--ping-timeout", "1",
        "--backoff-base", "0.05",
        "--backoff-max", "0.5",
    ]  # fmt: skip
    if smtp_url is not None:
        args += ["--smtp-url", smtp_url]
    return [*args, *extra]
