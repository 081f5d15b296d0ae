"""The dashboard: rendering (pure, into a recording Console), the health query against the
real database, and the live loop's shutdown: the `q` key, Ctrl-C, and the terminal restored."""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import pty
import re
import subprocess
import termios
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from rich.console import Console
from rich.text import Text

from tests.conftest import count_by_status, wait_until
from tests.test_cli import REPO, _env, cli, worker_argv
from worker.dashboard.summary import log_summaries, summary_line
from worker.dashboard.view import render, run_dashboard
from worker.intent import Intent
from worker.observe.health import COUNT_CAP, QUERY_TIMEOUT, HealthMonitor
from worker.observe.stats import Snapshot, Stats
from worker.outcome import Dead, Retry, Sent
from worker.producer import enqueue
from worker.store.db import create_pool
from worker.store.queries import Store
from worker.store.rows import DbHealth
from worker.store.sqlfiles import Names
from worker.units import fmt_duration

ALT_SCREEN_ON, ALT_SCREEN_OFF, SHOW_CURSOR = "\x1b[?1049h", "\x1b[?1049l", "\x1b[?25h"
SIZES = [(80, 24), (160, 48)]


# --- snapshots -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def _intent(clock: FakeClock, n: int, kind: str, age: float = 0.05) -> Intent:
    created = datetime.fromtimestamp(clock.wall - age, UTC)
    return Intent(n, kind, {}, 1, 5, created, created)


def _health(**overrides: object) -> DbHealth:
    values: dict[str, object] = dict(
        pending_due=0,
        pending_later=0,
        processing=0,
        dead=0,
        count_cap=10_000,
        oldest_due_seconds=None,
        notify_queue_usage=0.0,
        idle_workers=1,
        live_tuples=5000,
        dead_tuples=120,
        last_autovacuum_seconds=42.0,
        table_bytes=3_500_000,
        oldest_xact_seconds=None,
        oldest_xact_pid=None,
        oldest_xact_application=None,
    )
    values.update(overrides)
    return DbHealth(**values)  # type: ignore[arg-type]


def idle_snapshot() -> Snapshot:
    clock = FakeClock()
    stats = Stats(8, clock=lambda: clock.mono, wall=lambda: clock.wall)
    stats.on_listener(True)
    stats.on_idle(True)
    clock.advance(125.0)
    stats.on_db_health(_health())
    stats.on_poll()
    return stats.snapshot()


def busy_snapshot() -> tuple[Snapshot, FakeClock, Stats]:
    clock = FakeClock()
    stats = Stats(8, clock=lambda: clock.mono, wall=lambda: clock.wall)
    stats.on_listener(True)
    n = 0
    for second in range(70):
        for k in range(100 + second):
            n += 1
            kind = "email" if n % 4 else "webhook"
            stats.on_recorded(_intent(clock, n, kind, age=0.01 + 0.001 * (k % 50)), Sent())
        clock.advance(1.0)
    for slot in range(6):
        stats.on_delivery_start(slot, _intent(clock, 90_000 + slot, "email"))
        clock.advance(0.1)
    stats.on_notification()
    stats.on_db_health(
        _health(pending_due=37, pending_later=5, processing=6, oldest_due_seconds=0.3)
    )
    return stats.snapshot(), clock, stats


def failing_snapshot() -> Snapshot:
    _, clock, stats = busy_snapshot()
    stats.on_listener(False)
    stats.on_recorded(
        _intent(clock, 555, "webhook"),
        Retry(2.0, "ConnectError: https://bot:s3cret-token@hooks.example.com/x: 503"),
    )
    stats.on_recorded(_intent(clock, 556, "email"), Dead("550 5.1.1 <x@example.com>: no mailbox"))
    stats.on_delivery_start(7, _intent(clock, 777, "webhook"))
    stats.on_db_health(
        _health(
            pending_due=10_000,
            oldest_due_seconds=95.0,
            dead=3,
            oldest_xact_seconds=1800.0,
            oldest_xact_pid=4242,
            oldest_xact_application="psql",
            notify_queue_usage=0.62,
        )
    )
    clock.advance(75.0)  # slot 7 has been on intent 777 for 75 s
    stats.on_db_health_failed("ConnectionRefusedError: [Errno 111] Connect call failed")
    return stats.snapshot()


def screen(snap: Snapshot, width: int, height: int, notice: str | None = None) -> str:
    console = Console(record=True, width=width, height=height, color_system=None)
    console.print(render(snap, "outbox-worker test", notice))
    text = console.export_text()
    lines = text.splitlines()
    assert len(lines) == height, f"{len(lines)} lines for a {height}-line screen"
    assert max(Text(line).cell_len for line in lines) <= width
    return text


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_idle_relay(width: int, height: int):
    text = screen(idle_snapshot(), width, height)
    assert text.splitlines()[0].rstrip().endswith(" idle")  # the verdict
    assert "up 2m05s" in text
    assert "Slots 0/8 busy" in text and text.count("idle") >= 8
    assert "nothing sent in the last 60s" in text
    assert "pending 0 · none waiting · processing 0 · dead 0" in text
    assert "LISTEN ok (asleep)" in text
    assert "no errors in this run" in text and "nothing delivered yet" in text
    assert "q or Ctrl-C: stop gracefully" in text


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_busy_relay(width: int, height: int):
    snap, _, _ = busy_snapshot()
    text = screen(snap, width, height)
    assert "keeping up" in text.splitlines()[0]
    assert "167/s now" in text and "peak 169/s" in text  # the last 5 s: 165..169 sent/s
    assert "p50 " in text and "p95 " in text and "p99 " in text
    assert "Slots 6/8 busy" in text and "#90000" in text and "#90005" in text
    for kind in snap.kinds:
        assert re.search(rf"│\s+{kind.kind}\s+{kind.sent:,}\s+0\s+0\s+│", text), kind
    assert "pending 42 · oldest waiting 0.3s · processing 6 · dead 0" in text
    assert "▁" in text or "█" in text  # the sparkline
    if width >= 160:
        assert "pending: 37 due, 5 run_at later, 0 held" in text
        assert "vacuumed 42s ago" in text and "table 3.3MB" in text


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_failing_relay(width: int, height: int):
    text = screen(failing_snapshot(), width, height, notice="warning: heartbeat failed")
    header = text.splitlines()[0]
    assert "database unreachable" in header
    assert "pending 10,000+ · oldest waiting 1m35s" in text
    assert "LISTEN down: polling until it is back" in text
    assert "oldest xact 30m00s, xact by pid 4242 (psql)" in text
    assert "retry" in text and "#555" in text and "dead" in text and "#556" in text
    assert "s3cret-token" not in text and "https://bot:***@hooks.example.com" in text
    assert "#777" in text and "1m15s" in text  # the stuck slot
    assert "warning: heartbeat failed" in text
    if width >= 160:
        assert "queue 62.0%" in text


@pytest.mark.parametrize("width", [80, 100, 121, 160, 237])
def test_the_last_minute_chart_uses_the_whole_width(width: int):
    snap, _, _ = busy_snapshot()  # every second of the last minute sent 100+
    text = screen(snap, width, 24)
    [row] = [line for line in text.splitlines() if line.startswith("│ last 60s")]
    bars = row[len("│ last 60s") :].rstrip(" │")
    # the panel's border and padding (4) and the label (10) take the rest
    assert len(bars.strip()) == width - 14, row
    assert set(bars.strip()) <= set("▁▂▃▄▅▆▇█")


def test_queue_counts_are_the_table_statuses():
    stats = Stats(4)
    stats.on_db_health(
        _health(pending_due=3, pending_later=4, pending_held=5, processing=2, dead=1)
    )
    text = screen(stats.snapshot(), 160, 30)
    assert "pending 12 · none waiting · processing 2 · dead 1" in text
    assert "pending: 3 due, 4 run_at later, 5 held" in text
    assert "scheduled" not in text and "due 3 ·" not in text


def test_stopping_relay_says_how_to_cancel():
    _, _, stats = busy_snapshot()
    text = screen(stats.snapshot(stopping=True), 80, 24)
    assert "STOPPING" in text.splitlines()[0]
    assert "stopping: 6 in flight; q/Ctrl-C again cancels them" in text


def test_claims_paused_by_a_stuck_outcome_writer_show_in_the_verdict_and_the_summary():
    _, clock, stats = busy_snapshot()
    stats.outcomes_unrecorded = 16
    stats.on_claims_paused(1.0)
    clock.advance(11.0)
    stats.on_claims_paused(3.0)  # the same stall, still going: counted once
    snap = stats.snapshot()
    assert snap.claim_pauses == 1 and snap.claims_paused == pytest.approx(12.0)
    text = screen(snap, 120, 30)
    assert "claims paused 12s" in text.splitlines()[0]
    assert "claims paused 12s: 16 outcomes unrecorded" in text
    assert "attention: claims paused 12s" in summary_line(snap)
    stats.on_claims_paused(None)
    assert "claims paused" not in screen(stats.snapshot(), 120, 30)


def test_polling_only_relay():
    clock = FakeClock()
    stats = Stats(2, clock=lambda: clock.mono, wall=lambda: clock.wall)
    text = screen(stats.snapshot(listen=False), 80, 24)
    assert "polling only (--no-listen)" in text
    assert "waiting for the first database read" in text


def test_many_slots_in_a_small_terminal_show_the_longest_running_first():
    clock = FakeClock()
    stats = Stats(64, clock=lambda: clock.mono, wall=lambda: clock.wall)
    for slot in range(20):
        stats.on_delivery_start(slot, _intent(clock, 1000 + slot, "email"))
        clock.advance(0.5)
    text = screen(stats.snapshot(), 80, 24)
    assert "Slots 20/64 busy" in text
    assert "#1000" in text  # the oldest delivery
    assert "#1019" not in text
    assert "busy, 44 idle" in text
    wide = screen(stats.snapshot(), 160, 48)
    assert "#1019" in wide  # room for all of them in two columns


def test_summary_line_for_logs():
    snap, _, _ = busy_snapshot()
    line = summary_line(snap)
    assert "over the last minute" in line and "busy slots 6/8" in line
    assert "p50" in line and "pending 42 (37 due), oldest waiting 0.3s, processing 6" in line
    assert "attention" not in line
    assert "attention: database unreachable" in summary_line(failing_snapshot())


async def test_summary_lines_are_logged_with_fresh_database_numbers(
    pg_dsn: str, db, names: Names, start_relay, caplog
):
    caplog.set_level(logging.INFO, logger="outbox.stats")
    pool = await create_pool(pg_dsn, max_size=1, application_name="outbox-worker test")
    try:
        async with start_relay({"noop": lambda _i: anyio.lowlevel.checkpoint()}) as relay:
            health = HealthMonitor(pool, relay.store, relay.stats)
            async with anyio.create_task_group() as tg:
                tg.start_soon(log_summaries, relay, health, 0.05)
                await enqueue(db, "noop", {}, schema=names.schema)
                await wait_until(
                    lambda: any("(1 in this run)" in r.getMessage() for r in caplog.records)
                )
                tg.cancel_scope.cancel()
    finally:
        await pool.close()
    line = next(r.getMessage() for r in caplog.records if "(1 in this run)" in r.getMessage())
    assert "pending 0 (0 due), processing 0, dead 0" in line and "db numbers" not in line


def test_durations_read_at_a_glance():
    assert [fmt_duration(s) for s in (0.04, 9.94, 12.4, 192, 7500, 270_000)] == [
        "0.0s",
        "9.9s",
        "12s",
        "3m12s",
        "2h05m",
        "3d03h",
    ]


# --- the health query against the real database ------------------------------------------------


async def test_health_query_counts_by_state_and_stops_at_the_cap(pg_dsn: str, db, names: Names):
    table = f'"{names.schema}".intent'
    await db.execute(
        f"INSERT INTO {table} (kind, payload, run_at) SELECT 'k', '{{}}', now() - interval '7s' "
        "FROM generate_series(1, 5)"
    )
    await db.execute(
        f"INSERT INTO {table} (kind, payload, run_at) SELECT 'k', '{{}}', now() + interval '1h' "
        "FROM generate_series(1, 2)"
    )
    await db.execute(
        f"INSERT INTO {table} (kind, payload, status, last_error) VALUES ('k', '{{}}', 'dead', 'x')"
    )
    await db.execute(
        f"INSERT INTO {table} (kind, payload, status, locked_by, locked_until) "
        "VALUES ('k', '{}', 'processing', 'w', now() + interval '1m')"
    )
    # An open transaction holding a snapshot: the xmin horizon the dashboard must show.
    holder = await db.fetchval("SELECT pg_backend_pid()")
    pool = await create_pool(pg_dsn, max_size=1, application_name="outbox-worker test")
    try:
        store = Store(names)
        async with db.transaction(isolation="repeatable_read"):
            await db.fetchval("SELECT txid_current()")
            await anyio.sleep(0.05)
            health = await store.db_health(pool, cap=COUNT_CAP, timeout=QUERY_TIMEOUT)
            capped = await store.db_health(pool, cap=3, timeout=QUERY_TIMEOUT)
    finally:
        await pool.close()
    assert (health.pending_due, health.pending_later, health.processing, health.dead) == (
        5,
        2,
        1,
        1,
    )
    assert health.oldest_due_seconds is not None and 6.5 < health.oldest_due_seconds < 60
    assert health.table_bytes and health.table_bytes > 0
    assert 0.0 <= health.notify_queue_usage < 1.0
    # Another session may hold an even older transaction on a shared server.
    assert health.oldest_xact_seconds is not None and health.oldest_xact_seconds >= 0.05
    assert health.oldest_xact_pid is not None
    if health.oldest_xact_pid == holder:
        assert health.oldest_xact_seconds < 60
    assert (capped.pending_due, capped.count_cap) == (3, 3)


async def test_the_dashboard_pending_count_is_the_table_pending_count(
    pg_dsn: str, db, names: Names
):
    """Due, later and held (behind the head of their ordering key) add up to what
    ``WHERE status = 'pending'`` counts, so an operator can go from the screen to SQL."""
    table = f'"{names.schema}".intent'
    await db.execute(
        f"INSERT INTO {table} (kind, payload, run_at, ordering_key, ordering_held) VALUES "
        "('k', '{}', now(), NULL, false), ('k', '{}', now() + interval '1h', NULL, false), "
        "('k', '{}', now(), 'a', false), ('k', '{}', now(), 'a', true), "
        "('k', '{}', now(), 'a', true)"
    )
    health = await _read_health(pg_dsn, names)
    in_sql = await db.fetchval(f"SELECT count(*) FROM {table} WHERE status = 'pending'")
    assert (health.pending_due, health.pending_later, health.pending_held) == (2, 1, 2)
    assert health.pending == in_sql == 5


async def _read_health(pg_dsn: str, names: Names) -> DbHealth:
    """One read of the health query, as the dashboard does it."""
    pool = await create_pool(pg_dsn, max_size=1, application_name="outbox-worker test")
    try:
        return await Store(names).db_health(pool, cap=COUNT_CAP, timeout=QUERY_TIMEOUT)
    finally:
        await pool.close()


async def test_health_query_and_dashboard_show_halted_ordering_keys(pg_dsn: str, db, names: Names):
    table = f'"{names.schema}".intent'
    # Key a: dead head, 2 waiting (halted). Key b: its dead intent was skipped (moves on).
    # Key c: a dead intent behind a pending one (not the head: not halted yet).
    await db.execute(
        f"INSERT INTO {table} (kind, payload, status, last_error, ordering_key, ordering_skipped) "
        "VALUES ('k', '{}', 'dead', 'x', 'a', false), ('k', '{}', 'pending', NULL, 'a', false), "
        "('k', '{}', 'pending', NULL, 'a', false), ('k', '{}', 'dead', 'x', 'b', true), "
        "('k', '{}', 'pending', NULL, 'c', false), ('k', '{}', 'dead', 'x', 'c', false)"
    )
    health = await _read_health(pg_dsn, names)
    assert (health.halted_keys, health.oldest_halted_key) == (1, "a")
    assert health.oldest_halted_seconds is not None and health.oldest_halted_seconds >= 0
    stats = Stats(4)
    stats.on_db_health(health)
    text = screen(stats.snapshot(), 120, 30)
    assert "1 keys halted" in text.splitlines()[0]
    assert "keys halted 1 (oldest 'a'," in text


async def test_nothing_due_when_the_earliest_pending_is_scheduled(pg_dsn: str, db, names: Names):
    await db.execute(
        f'INSERT INTO "{names.schema}".intent (kind, payload, run_at) '
        "VALUES ('k', '{}', now() + interval '1h')"
    )
    health = await _read_health(pg_dsn, names)
    assert health.oldest_due_seconds is None and health.pending_later == 1


# --- the live loop -------------------------------------------------------------------------------


async def test_dashboard_task_draws_and_restores_the_screen_when_cancelled(start_relay):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=24, color_system=None)
    async with start_relay({"noop": lambda _i: anyio.lowlevel.checkpoint()}) as relay:
        await wait_until(lambda: relay.stats.listener_connected)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run_dashboard(relay, console=console, keyboard_fd=None))
                await wait_until(lambda: out.getvalue().count("Slots 0/4 busy") >= 2)
                tg.cancel_scope.cancel()
    drawn = out.getvalue()
    assert ALT_SCREEN_ON in drawn[:50] and "LISTEN ok" in drawn
    last_frame = drawn.rindex("Slots")
    assert ALT_SCREEN_OFF in drawn[last_frame:] and SHOW_CURSOR in drawn[last_frame:]


async def test_q_stops_gracefully_then_cancels_in_flight_and_restores_the_terminal(
    db, names: Names, start_relay, caplog
):
    started = anyio.Event()

    async def hang(_intent: Intent) -> None:
        started.set()
        await anyio.sleep_forever()

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, height=24, color_system=None)
    try:
        async with start_relay({"hang": hang}, grace=30.0) as relay:
            intent_id = await enqueue(db, "hang", {}, schema=names.schema)
            with anyio.fail_after(20):
                await started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: run_dashboard(relay, console=console, keyboard_fd=slave))
                await wait_until(lambda: "Slots 1/4 busy" in out.getvalue())
                assert not termios.tcgetattr(slave)[3] & termios.ICANON  # single keys
                os.write(master, b"q")
                await wait_until(lambda: relay.stopping)
                await wait_until(lambda: "q/Ctrl-C again cancels them" in out.getvalue())
                assert relay.in_flight  # phase one waits for the delivery (30 s of grace)
                os.write(master, b"q")  # phase two: cancel it and release the row
                await wait_until(lambda: not relay.in_flight)
                tg.cancel_scope.cancel()
            # The log says why deliveries were cancelled: not "grace period over".
            assert "second stop request: cancelled 1 deliveries" in caplog.text
            assert termios.tcgetattr(slave) == before
        row = await db.fetchrow(
            f'SELECT status, attempts FROM "{names.schema}".intent WHERE id = $1', intent_id
        )
        assert (row["status"], row["attempts"]) == ("pending", 0)  # released, attempt refunded
    finally:
        os.close(master)
        os.close(slave)


def _read_available(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the child closed its side
            if exc.errno == errno.EIO:
                return
            raise
        if not chunk:
            return
        into.extend(chunk)


async def test_cli_dashboard_in_a_terminal_stops_on_ctrl_c(pg_dsn: str, schema: str, db, names):
    """The real command on a pseudo-terminal: Ctrl-C is the tty's SIGINT, as for a person."""
    async with db.transaction():
        for n in range(20):
            await enqueue(db, "noop", {"n": n}, schema=schema)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")  # 24 x 80
    before = termios.tcgetattr(slave)
    env = _env({"TERM": "xterm-256color"})
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; we poll it without blocking
        worker_argv(pg_dsn, schema),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=REPO,
        env=env,
        start_new_session=True,
        # the pty becomes the child's controlling terminal, so ^C raises SIGINT there
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.set_blocking(master, False)
    output = bytearray()
    try:

        async def drawn(text: bytes) -> bool:
            _read_available(master, output)
            return text in output

        await wait_until(lambda: drawn(b"q or Ctrl-C: stop gracefully"), timeout=30)
        await wait_until(lambda: drawn(b"20 sent"), timeout=30)
        os.write(master, b"\x03")
        with anyio.fail_after(30):
            while proc.poll() is None:
                _read_available(master, output)
                await anyio.sleep(0.05)
        _read_available(master, output)
        after = termios.tcgetattr(slave)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert ALT_SCREEN_ON in text and ALT_SCREEN_OFF in text
    after_screen = text[text.rindex(ALT_SCREEN_OFF) :]
    assert "SIGINT received" in after_screen and "stopped" in after_screen  # logs replayed
    assert after == before  # cbreak undone
    assert await count_by_status(db, names) == {"sent": 20}


def test_demo_refuses_a_schema_that_is_not_its_own():
    result = cli("demo", "--dsn", "postgresql://x@127.0.0.1:1/x", "--schema", "outbox")
    assert result.returncode == 2
    assert "the demo empties its schema" in result.stderr


async def test_demo_runs_end_to_end_without_a_terminal(pg_dsn: str):
    schema = f"outbox_demo_{os.urandom(4).hex()}"
    args = ("demo", "--dsn", pg_dsn, "--schema", schema, "--duration", "3", "--rate", "40")
    conn = await asyncpg.connect(pg_dsn)
    try:
        result = await anyio.to_thread.run_sync(lambda: cli(*args, timeout=90))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "intents committed" in result.stdout and "caught" in result.stdout
        assert "Traceback" not in result.stderr
        sent = await conn.fetchval(
            f"SELECT count(*) FROM \"{schema}\".intent WHERE status = 'sent'"
        )
        assert sent > 0
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
