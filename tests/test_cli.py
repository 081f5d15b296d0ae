"""The `outbox-worker` command, run as a real subprocess against the real database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import orjson
import pytest

from tests.conftest import count_by_status, embedded_pgdata, wait_until
from worker.cli.arguments import COMMANDS, build_parser
from worker.producer import enqueue
from worker.store.migrate import schema_exists
from worker.store.sqlfiles import Names

REPO = Path(__file__).resolve().parent.parent


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(env),
        cwd=REPO,
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


NOWHERE = ("--dsn", "postgresql://x@127.0.0.1:1/x")  # never reached: the error comes first


def _only_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command line prints (exit status 2, as argparse's)."""
    assert (result.returncode, result.stdout) == (2, ""), result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("outbox-worker: error: ")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--concurrency", "0"), "--concurrency: expected a positive integer, got '0'"),
        (("run", "--concurrency", "abc"), "--concurrency: expected a positive integer, got 'abc'"),
        (("--lease", "-3"), "--lease: expected a positive number, got '-3'"),
        (("--linger", "soon"), "--linger: expected a number, 0 or more, got 'soon'"),
        (("--concurency", "8"), "unknown flag --concurency; did you mean --concurrency?"),
        (("--concurency=8",), "unknown flag --concurency; did you mean --concurrency?"),
        (("--frobnicate",),
         "unknown flag --frobnicate (`outbox-worker run --help` lists the flags)"),
        (("status", "--concurrency", "8"),
         "--concurrency is a flag of run and demo, not of status"),
        (("stauts",), "unknown command 'stauts'; did you mean status?"),
        (("--json", "status"),
         "'status' is a command and comes first: outbox-worker status [options]"),
        (("purge", "--older-than", "soon"),
         "--older-than: expected a duration such as 30d, 12h, 90m or 600s, got 'soon'"),
        (("--retain-sent", "a week"),
         "--retain-sent: expected a duration such as 24h, 7d, 90m or 600s, or forever, "
         "got 'a week'"),
        (("--ordering-on-dead", "skip"),
         "--ordering-on-dead: expected halt or continue, got 'skip'"),
        (("enqueue", "email"),
         "the following arguments are required: payload (see `outbox-worker enqueue --help`)"),
        (("--linger", "5"),
         "--linger (5 s) must be at least 0 and shorter than --poll-interval (2 s)"),
    ],
)  # fmt: skip
def test_a_bad_command_line_is_one_line_that_names_the_fix(args: tuple[str, ...], error: str):
    assert _only_error(cli(*args, *NOWHERE)) == error


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("OUTBOX_CONCURRENCY", "abc", "OUTBOX_CONCURRENCY: expected a positive integer, got 'abc'"),
        ("OUTBOX_POLL_INTERVAL", "soon",
         "OUTBOX_POLL_INTERVAL: expected a positive number, got 'soon'"),
        ("OUTBOX_NO_LISTEN", "maybe",
         "OUTBOX_NO_LISTEN: expected a boolean (1/0, true/false, yes/no, on/off), got 'maybe'"),
        ("OUTBOX_LOG_FORMAT", "xml", "OUTBOX_LOG_FORMAT: expected text or json, got 'xml'"),
        ("OUTBOX_RETAIN_DEAD", "0",
         "OUTBOX_RETAIN_DEAD: expected a duration such as 24h, 7d, 90m or 600s, or forever, "
         "got '0'"),
    ],
)  # fmt: skip
def test_a_bad_environment_value_is_one_line(variable: str, value: str, error: str):
    assert _only_error(cli(*NOWHERE, env={variable: value})) == error


def test_help_shows_the_commands_and_every_worker_flag():
    result = cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    run = build_parser().commands["run"]
    flags = [flag for action in run._actions for flag in action.option_strings]
    assert "--concurrency" in flags and "--lease" in flags
    for flag in flags:
        assert f" {flag}" in result.stdout, flag
    for command in COMMANDS:
        assert f"\n    {command} " in result.stdout, command
    assert "OUTBOX_CONCURRENCY" in result.stdout
    assert "`outbox-worker COMMAND --help` lists the options of the other commands" in result.stdout


def test_a_bad_payload_is_refused_before_any_database_is_started():
    # Unreachable --dsn: had the command connected first, it would say so instead.
    assert _only_error(cli("enqueue", "email", "notjson", *NOWHERE)) == (
        "payload: expected JSON, got 'notjson'"
    )


@pytest.mark.parametrize("schema", ['out"box', "a;drop table x", "9lives", "x" * 64])
def test_hostile_schema_name_is_refused(schema: str):
    result = cli("status", "--dsn", "postgresql://x@127.0.0.1:1/x", "--schema", schema)
    assert result.returncode == 2
    assert "invalid schema name" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_database_is_one_line_without_password():
    dsn = "postgresql://app:s3cr3t-pw@127.0.0.1:1/app"
    result = cli("status", "--dsn", dsn)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-worker: error: cannot connect to PostgreSQL at ")
    assert "postgresql://app:***@127.0.0.1:1/app" in lines[0]
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_schema_prints_sql_for_the_configured_names():
    result = cli("schema", "--schema", "Billing")
    assert result.returncode == 0
    assert 'CREATE TABLE IF NOT EXISTS "Billing".intent' in result.stdout
    assert "pg_notify('Billing_intent'" in result.stdout
    assert "{{" not in result.stdout


def test_run_refuses_a_database_without_the_schema(pg_dsn: str, schema: str):
    result = cli("--dsn", pg_dsn, "--schema", schema)
    assert result.returncode == 2
    assert f"table {schema}.intent does not exist: run `outbox-worker migrate`" in result.stderr


def test_migrate_says_whether_it_created_the_schema(pg_dsn: str, schema: str):
    common = ("--dsn", pg_dsn, "--schema", schema)
    first, again = cli("migrate", *common), cli("migrate", *common)
    # Only the result on stdout: a one-shot command logs warnings, not its INFO lines.
    assert (first.returncode, first.stdout, first.stderr) == (0, f"schema {schema} created\n", "")
    assert (again.returncode, again.stdout, again.stderr) == (
        0,
        f"schema {schema} is up to date\n",
        "",
    )


async def test_migrate_says_which_migrations_it_applied(pg_dsn: str, schema: str) -> None:
    """A schema a migration behind (its record gone, as before that release) is upgraded,
    and the one line says so instead of "is up to date"."""
    common = ("--dsn", pg_dsn, "--schema", schema)
    assert cli("migrate", *common).returncode == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        last = await conn.fetchval(f'SELECT max(version) FROM "{schema}".schema_version')
        name = await conn.fetchval(
            f'DELETE FROM "{schema}".schema_version WHERE version = $1 RETURNING name', last
        )
    finally:
        await conn.close()
    again = cli("migrate", *common)
    assert (again.returncode, again.stdout) == (
        0,
        f"schema {schema} upgraded: migration {last:04d}_{name} applied\n",
    )


@pytest.mark.parametrize("command", [("status",), ("enqueue", "email", "{}"), ("skip-dead", "k")])
def test_an_operator_command_on_a_database_without_the_schema_is_one_line(
    pg_dsn: str, schema: str, command: tuple[str, ...]
):
    result = cli(*command, "--dsn", pg_dsn, "--schema", schema)
    assert _only_error(result) == (
        f"table {schema}.intent does not exist: run `outbox-worker migrate` "
        "(or start the worker with --migrate)"
    )


# `python -m worker` with the embedded server in the given data directory, not the user's.
EMBEDDED_MAIN = """
import sys
from pathlib import Path
import worker.cli.embedded
worker.cli.embedded.default_data_dir = lambda: Path(sys.argv[1])
from worker.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def pgdata() -> Iterator[Path]:
    with embedded_pgdata("outbox-cli-") as path:
        yield path


def test_one_shot_commands_on_the_embedded_database_print_only_their_result(pgdata: Path):
    def embedded(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", EMBEDDED_MAIN, str(pgdata), *args]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=180, env=_env(), cwd=REPO
        )

    # A fresh data directory: the command starts the server and creates the schema, quietly
    # (as root, but for the one warning that it creates a data directory run by another user).
    made = embedded("enqueue", "email", '{"to": "a@example.com"}')
    assert made.returncode == 0 and made.stdout.strip().isdigit(), made
    expected = ["first start as root"] if os.geteuid() == 0 else []
    assert [line for line in expected if line in made.stderr] == expected, made
    assert len(made.stderr.splitlines()) == len(expected), made
    verbose = embedded("status", "--json", "-v")
    assert verbose.returncode == 0, verbose
    assert orjson.loads(verbose.stdout)["by_kind"] == {"email": {"pending": 1}}
    assert "starting an embedded PostgreSQL" in verbose.stderr
    assert "embedded PostgreSQL ready in" in verbose.stderr


async def test_migrate_enqueue_status_retry_dead(pg_dsn: str, schema: str, db, names: Names):
    common = ("--dsn", pg_dsn, "--schema", schema)
    assert cli("migrate", *common).returncode == 0  # again, on a migrated schema
    made = cli("enqueue", *common, "email", '{"to": "a@example.com"}', "--dedupe-key", "k1")
    assert made.returncode == 0 and made.stdout.strip().isdigit() and made.stderr == ""
    again = cli("enqueue", *common, "email", '{"to": "b@example.com"}', "--dedupe-key", "k1")
    assert made.stdout.strip() == again.stdout.strip()
    await db.execute(
        f"UPDATE \"{schema}\".intent SET status = 'dead', last_error = 'boom' WHERE id = $1",
        int(made.stdout),
    )
    report = orjson.loads(cli("status", *common, "--json").stdout)
    assert report["by_kind"] == {"email": {"dead": 1}} and report["dead"] == 1
    human = cli("status", *common)
    assert "email" in human.stdout and "retry-dead" in human.stdout
    retried = cli("retry-dead", *common, "--kind", "email")
    assert "1 dead intents back to pending" in retried.stdout
    assert await count_by_status(db, names) == {"pending": 1}


async def test_ordering_key_commands(pg_dsn: str, schema: str, db, names: Names):
    common = ("--dsn", pg_dsn, "--schema", schema)
    ids = [
        int(cli("enqueue", *common, "noop", "{}", "--ordering-key", "order-7").stdout)
        for _ in range(3)
    ]
    table = f'"{schema}".intent'
    assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE ordering_key = 'order-7'") == 3
    await db.execute(
        f"UPDATE {table} SET status = 'dead', last_error = 'refused' WHERE id = $1", ids[0]
    )
    report = orjson.loads(cli("status", *common, "--json").stdout)["ordering"]
    assert (report["halted_keys"], report["held_intents"]) == (1, 2)
    assert report["oldest_halted"]["key"] == "order-7"
    assert report["oldest_halted"]["dead_intent"] == ids[0]
    human = cli("status", *common).stdout
    assert "halted by a dead intent: 1" in human and "skip-dead" in human
    skipped = cli("skip-dead", *common, "order-7")
    assert skipped.returncode == 0 and f"intent {ids[0]} stays dead" in skipped.stdout
    again = cli("skip-dead", *common, "order-7")
    assert again.returncode == 2 and "is not halted by a dead intent" in again.stderr
    assert orjson.loads(cli("status", *common, "--json").stdout)["ordering"]["halted_keys"] == 0
    retried = cli("retry-dead", *common, "--key", "order-7")
    assert "1 dead intents back to pending" in retried.stdout
    assert await db.fetchval(f"SELECT ordering_skipped FROM {table} WHERE id = $1", ids[0]) is False


def worker_argv(pg_dsn: str, schema: str, *extra: str) -> list[str]:
    """``python -m worker`` on the test schema with tests/sample_handlers.py, polling fast."""
    return [
        sys.executable,
        "-m",
        "worker",
        "--dsn",
        pg_dsn,
        "--schema",
        schema,
        "--handlers",
        "tests.sample_handlers:handlers",
        "--poll-interval",
        "0.5",
        *extra,
    ]


def _start_worker(pg_dsn: str, schema: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        worker_argv(pg_dsn, schema, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=REPO,
    )


async def _sigterm_and_wait(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM ``proc`` and wait for it to exit; fail the test after ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(timeout):
        while proc.poll() is None:  # noqa: ASYNC110 - a subprocess's exit sets no event
            await anyio.sleep(0.05)


async def test_sigterm_finishes_in_flight_work_and_exits_zero(pg_dsn: str, schema: str, db, names):
    async with db.transaction():
        for _ in range(12):
            await enqueue(db, "slow", {"seconds": 0.5}, schema=schema)
    proc = _start_worker(pg_dsn, schema, "--concurrency", "4", "--grace", "20")
    try:
        await wait_until(lambda: _any(db, schema, "processing"), timeout=30)
        await _sigterm_and_wait(proc)
    finally:
        proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, output
    counts = await count_by_status(db, names)
    assert "processing" not in counts
    assert counts.get("sent", 0) >= 4  # the in-flight ones finished within the grace period
    assert counts.get("sent", 0) + counts.get("pending", 0) == 12


async def test_grace_period_over_releases_rows_back_to_pending(pg_dsn: str, schema: str, db, names):
    async with db.transaction():
        ids = [await enqueue(db, "slow", {"seconds": 600}, schema=schema) for _ in range(3)]
    proc = _start_worker(pg_dsn, schema, "--concurrency", "4", "--grace", "0.5")
    try:
        await wait_until(lambda: _count(db, schema, "processing", 3), timeout=30)
        await _sigterm_and_wait(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0
    rows = await db.fetch(f'SELECT * FROM "{schema}".intent WHERE id = ANY($1)', ids)
    # Released, not failed: back to pending with the attempt given back.
    assert {(r["status"], r["attempts"], r["locked_by"]) for r in rows} == {("pending", 0, None)}


async def _any(db, schema: str, status: str) -> bool:
    return bool(
        await db.fetchval(f'SELECT count(*) FROM "{schema}".intent WHERE status = $1', status)
    )


async def _count(db, schema: str, status: str, n: int) -> bool:
    got = await db.fetchval(f'SELECT count(*) FROM "{schema}".intent WHERE status = $1', status)
    return bool(got == n)


async def test_a_lease_shorter_than_the_ping_interval_is_kept_alive_by_the_heartbeat(
    pg_dsn: str, schema: str, names: Names
):
    """`--lease 3` under the default 5 s --ping-interval (once refused): a delivery of 8 s,
    well past the lease, stays with its worker; the other worker never rescues it."""
    workers = [_start_worker(pg_dsn, schema, "--migrate", "--lease", "3") for _ in range(2)]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await wait_until(lambda: schema_exists(conn, names), timeout=60)
        intent_id = await enqueue(conn, "slow", {"seconds": 8}, schema=schema)
        await wait_until(lambda: _count(conn, schema, "sent", 1), timeout=60)
        attempts = await conn.fetchval(
            f'SELECT attempts FROM "{schema}".intent WHERE id = $1', intent_id
        )
        for proc in workers:
            await _sigterm_and_wait(proc)
    finally:
        await conn.close()
        for proc in workers:
            proc.kill()
    logs = [proc.stdout.read() if proc.stdout else "" for proc in workers]
    assert [proc.returncode for proc in workers] == [0, 0], logs
    assert attempts == 1, logs  # a rescue would have counted as an attempt
    # The long-running worker logs at INFO; the two raced to migrate, one of them created.
    both = "".join(logs)
    assert "rescued" not in both and "lost the lease" not in both
    assert both.count(f"schema {schema} created") == 1
    assert both.count(f"schema {schema} is up to date") == 1


async def test_purge_deletes_only_old_finished_intents(pg_dsn: str, schema: str, db, names):
    table = f'"{schema}".intent'
    async with db.transaction():
        ids = [await enqueue(db, "k", {"n": n}, schema=schema) for n in range(5)]
    old, recent, old_dead, old_pending = ids[0], ids[1], ids[2], ids[3]
    await db.execute(
        f"UPDATE {table} SET status = 'sent', sent_at = now() - interval '40 days' "
        "WHERE id = $1", old,
    )  # fmt: skip
    await db.execute(f"UPDATE {table} SET status = 'sent', sent_at = now() WHERE id = $1", recent)
    await db.execute(
        f"UPDATE {table} SET status = 'dead', last_error = 'x', "
        "created_at = now() - interval '40 days' WHERE id = $1", old_dead,
    )  # fmt: skip
    await db.execute(
        f"UPDATE {table} SET created_at = now() - interval '40 days' WHERE id = $1", old_pending
    )
    common = ("--dsn", pg_dsn, "--schema", schema)
    result = cli("purge", *common, "--older-than", "30d")
    assert result.returncode == 0 and "deleted 1 sent intents" in result.stdout
    result = cli("purge", *common, "--older-than", "30d", "--status", "dead")
    assert "deleted 1 dead intents" in result.stdout
    left = {r["id"] for r in await db.fetch(f"SELECT id FROM {table}")}
    assert left == {recent, old_pending, ids[4]}
