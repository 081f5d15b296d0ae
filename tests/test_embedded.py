"""Embedded PostgreSQL (worker.cli.embedded): start, connect, share, recover from crashed
holders."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from tests.conftest import embedded_pgdata
from worker.cli.embedded import EmbeddedPostgres, default_data_dir, start_embedded
from worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# A second process holding the server, like `outbox-worker enqueue` next to a running worker.
HOLDER = """
import sys
from pathlib import Path
from worker.cli.embedded import start_embedded
pg = start_embedded(Path(sys.argv[1]))
print(pg.dsn, flush=True)
sys.stdin.read()  # hold until stdin closes or we are killed
pg.stop()
"""


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """One data directory for the module: only the first test pays for initdb (~0.5-1.5 s)."""
    with embedded_pgdata("outbox-embedded-") as pgdata:
        yield pgdata
        pid = postmaster_pid(pgdata)
        if pid is not None and server_alive(pid):  # a failed test leaked a handle
            os.kill(pid, signal.SIGINT)  # fast shutdown
            wait_for(lambda: not server_alive(pid), "leaked server to stop")


@pytest.fixture
def pgdata(shared_dir: Path) -> Iterator[Path]:
    yield shared_dir
    assert postmaster_pid(shared_dir) is None, "a test left the server running"


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except FileNotFoundError:
        return None


def server_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def holders(pgdata: Path) -> list[int]:
    path = pgdata / ".handle_pids.json"
    return json.loads(path.read_text()) if path.exists() else []


def wait_for(cond: object, what: str, timeout: float = 10.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def spawn_holder(pgdata: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(pgdata)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def spawn_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free
    return proc.pid


async def select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        value = await conn.fetchval("SELECT 1")
        assert isinstance(value, int)
        return value
    finally:
        await conn.close()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == Path("/var/lib/outbox-worker/pgdata")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_data_dir() == tmp_path / "outbox-worker" / "pgdata"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_data_dir() == tmp_path / "home/.local/share/outbox-worker/pgdata"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == tmp_path / "home/.local/share/outbox-worker/pgdata"


async def test_connect_and_listen_notify(pgdata: Path) -> None:
    with start_embedded(pgdata) as pg:
        assert isinstance(pg, EmbeddedPostgres)
        assert pg.dsn.startswith("postgresql://postgres@/postgres?host=/")
        listener = await asyncpg.connect(pg.dsn, timeout=10)
        notifier = await asyncpg.connect(pg.dsn, timeout=10)
        try:
            assert await listener.fetchval("SELECT 1") == 1
            got: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def on_notify(conn: Any, pid: int, channel: str, payload: object) -> None:
                if not got.done():
                    got.set_result(str(payload))

            await listener.add_listener("outbox_test", on_notify)
            await notifier.execute("SELECT pg_notify('outbox_test', 'hello')")
            assert await asyncio.wait_for(got, timeout=10) == "hello"
        finally:
            await listener.close()
            await notifier.close()
    # pg_ctl -w stop returns once the server is down
    assert postmaster_pid(pgdata) is None
    assert holders(pgdata) == []


async def test_two_handles_in_one_process(pgdata: Path) -> None:
    first = start_embedded(pgdata)
    second = start_embedded(pgdata)
    try:
        assert first.dsn == second.dsn
        server = postmaster_pid(pgdata)
        first.stop()
        first.stop()  # idempotent
        assert postmaster_pid(pgdata) == server
        assert await select_one(second.dsn) == 1
    finally:
        second.stop()
    assert postmaster_pid(pgdata) is None


async def test_two_processes_and_a_sigkilled_holder(pgdata: Path) -> None:
    other = spawn_holder(pgdata)
    try:
        assert other.stdout is not None
        other_dsn = other.stdout.readline().strip()
        assert other_dsn, "holder process failed to start the server"
        server = postmaster_pid(pgdata)

        mine = start_embedded(pgdata)
        assert mine.dsn == other_dsn
        assert sorted(holders(pgdata)) == sorted([other.pid, os.getpid()])
        mine.stop()
        # the other process still holds it: still the same server, still answering
        assert postmaster_pid(pgdata) == server
        assert await select_one(other_dsn) == 1

        # a holder killed by SIGKILL never removes its pid; the next start must drop it
        other.kill()
        other.wait()
        with start_embedded(pgdata) as again:
            assert holders(pgdata) == [os.getpid()]
            assert await select_one(again.dsn) == 1
        assert postmaster_pid(pgdata) is None
    finally:
        other.kill()
        other.wait()


def test_dead_pid_in_holder_list_is_pruned(pgdata: Path) -> None:
    start_embedded(pgdata).stop()  # make sure the directory is initialised
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead_pid()]))
    pg = start_embedded(pgdata)
    assert holders(pgdata) == [os.getpid()]
    pg.stop()
    assert postmaster_pid(pgdata) is None
    assert holders(pgdata) == []


async def test_restart_after_server_crash(pgdata: Path) -> None:
    first = start_embedded(pgdata)
    try:
        crashed = postmaster_pid(pgdata)
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)
        wait_for(lambda: not server_alive(crashed), "killed postmaster to die")
        # postmaster.pid is left behind (its pid may even linger as a zombie)
        assert postmaster_pid(pgdata) == crashed
        with start_embedded(pgdata) as second:
            assert postmaster_pid(pgdata) not in (None, crashed)
            assert await select_one(second.dsn) == 1
    finally:
        first.stop()
    assert postmaster_pid(pgdata) is None


async def test_stale_postmaster_pid_with_reused_pid(pgdata: Path) -> None:
    start_embedded(pgdata).stop()
    # after a reboot or container restart the recorded pid may belong to anything;
    # PostgreSQL itself would refuse to start ("lock file already exists")
    squatter = spawn_sleeper()
    try:
        lines = [str(squatter.pid), str(pgdata), "1700000000", "5432", str(pgdata), "", "0 0"]
        (pgdata / "postmaster.pid").write_text("\n".join([*lines, "ready"]) + "\n")
        with start_embedded(pgdata) as pg:
            assert postmaster_pid(pgdata) != squatter.pid
            assert await select_one(pg.dsn) == 1
    finally:
        squatter.kill()
        squatter.wait()


def test_errors_are_one_line(pgdata: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "not-pgdata"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="neither empty nor a PostgreSQL data directory"):
        start_embedded(foreign)
    with pytest.raises(ConfigError, match="must not contain spaces"):
        start_embedded(tmp_path / "with space" / "pgdata")

    start_embedded(pgdata).stop()
    conf = pgdata / "postgresql.conf"
    good = conf.read_text()
    conf.write_text(good + "\nshared_buffers = 'bogus'\n")
    try:
        with pytest.raises(ConfigError) as err:
            start_embedded(pgdata)
    finally:
        conf.write_text(good)
    message = str(err.value)
    assert "\n" not in message
    assert "could not start" in message and str(pgdata) in message
    assert "contains errors" in message
    log = Path(message.rsplit("(log: ", 1)[1].rstrip(")"))
    assert "shared_buffers" in log.read_text()
    assert holders(pgdata) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root only")
def test_root_refuses_data_dir_under_root_home() -> None:
    target = Path("~root").expanduser() / "outbox-worker-test-pgdata"
    with pytest.raises(ConfigError, match="refusing"):
        start_embedded(target)
    assert not target.exists()
