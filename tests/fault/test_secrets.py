"""Passwords never leak: not in a log line, a traceback, ``status`` output or ``last_error``.

The worker runs with a PostgreSQL password in its DSN (as userinfo, and as the
``?password=`` parameter libpq and asyncpg accept) and an SMTP password in its SMTP URL,
both with characters that URLs must percent-encode. Errors are forced: wrong passwords,
the database and the SMTP server unreachable. Every form a password could take in output
is searched for: as given, percent-encoded, and base64 as AUTH PLAIN / LOGIN send it.
"""

from __future__ import annotations

import base64
import secrets
import signal
import sys
from urllib.parse import quote

import anyio
import asyncpg
import pytest

from tests.conftest import wait_until
from tests.fault.ledger import Outbox
from tests.fault.pgcluster import Cluster
from tests.fault.workers import REPO, WorkerProcess, worker_env
from tests.roles import dsn_as, login_roles
from tests.smtp_server import SmtpTestServer
from tests.tcp_proxy import TcpProxy
from worker.settings import default_channel
from worker.store.grants import grants_sql
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names

PG_USER = "fault_app"
PG_PASSWORD = "pg-S3cret/#?&=%x"
PG_WRONG = "pg-Wr0ng/#?&=%y"
SMTP_USER = "mailer"
SMTP_PASSWORD = "smtp-S3cret/#?&=%z"
SMTP_WRONG = "smtp-Wr0ng/#?&=%w"


def forms(user: str, password: str) -> set[str]:
    """Every spelling of ``password`` that could end up in output."""
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    return {password, quote(password, safe=""), quote(password), plain, login}


SECRETS = (
    forms(PG_USER, PG_PASSWORD)
    | forms(PG_USER, PG_WRONG)
    | forms(SMTP_USER, SMTP_PASSWORD)
    | forms(SMTP_USER, SMTP_WRONG)
)


def leaks(text: str) -> list[str]:
    return sorted(s for s in SECRETS if s in text)


def pg_dsns(password: str, host: str, port: int) -> list[str]:
    """The same credentials as userinfo and as a query parameter."""
    base = f"postgresql://{PG_USER}@{host}:{port}/postgres"
    return [
        f"postgresql://{PG_USER}:{quote(password, safe='')}@{host}:{port}/postgres",
        f"{base}?password={quote(password, safe='')}",
    ]


async def cli(*args: str) -> tuple[int, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "worker", *args], check=False, env=worker_env(), cwd=REPO
    )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture
async def app_role(own_pg: Cluster) -> str:
    """A role with a password on the suite's own cluster, and a schema it owns."""
    schema = f"t_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(own_pg.dsn())
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PG_USER)
        if not exists:
            await conn.execute(f'CREATE ROLE "{PG_USER}" LOGIN')
        # A bind parameter cannot carry a password in ALTER ROLE; quote the literal.
        await conn.execute(
            f"ALTER ROLE \"{PG_USER}\" PASSWORD '{PG_PASSWORD.replace(chr(39), chr(39) * 2)}'"
        )
        await conn.execute(f'GRANT CREATE ON DATABASE postgres TO "{PG_USER}"')
    finally:
        await conn.close()
    app = await asyncpg.connect(own_pg.dsn(user=PG_USER, password=PG_PASSWORD))
    try:
        await migrate(app, Names(schema, default_channel(schema)))
    finally:
        await app.close()
    return schema


async def test_wrong_database_password_is_one_line_without_the_password(own_pg, app_role):
    for dsn in pg_dsns(PG_WRONG, "127.0.0.1", own_pg.port):
        for command in ("run", "status"):
            code, output = await cli(command, "--dsn", dsn, "--schema", app_role)
            assert code == 2, output
            assert "password authentication failed" in output, output
            assert len(output.strip().splitlines()) == 1, output
            assert "Traceback" not in output
            assert leaks(output) == [], output


async def test_status_output_never_shows_the_password(own_pg, app_role):
    for dsn in pg_dsns(PG_PASSWORD, "127.0.0.1", own_pg.port):
        for extra in ([], ["--json"]):
            code, output = await cli("status", "--dsn", dsn, "--schema", app_role, *extra)
            assert code == 0, output
            assert leaks(output) == [], output


@pytest.mark.parametrize("dsn_form", ["userinfo", "query"])
async def test_worker_errors_never_show_a_password(own_pg, app_role, dsn_form: str):
    schema = app_role
    async with (
        SmtpTestServer(starttls=True, auth=(SMTP_USER, SMTP_PASSWORD)) as smtp,
        TcpProxy("127.0.0.1", own_pg.port) as pg_proxy,
        TcpProxy(smtp.host, smtp.port) as smtp_proxy,
    ):
        [dsn] = [
            d
            for d in pg_dsns(PG_PASSWORD, pg_proxy.host, pg_proxy.port)
            if ("?password=" in d) == (dsn_form == "query")
        ]
        smtp_url = (
            f"smtp://{quote(SMTP_USER)}:{quote(SMTP_WRONG, safe='')}@{smtp_proxy.host}:"
            f"{smtp_proxy.port}?tls=starttls&cafile={quote(smtp.cafile)}"
        )
        args = [
            "run", "--dsn", dsn, "--schema", schema, "--smtp-url", smtp_url,
            "--mail-from", "outbox@example.com", "--poll-interval", "0.5",
            "--backoff-base", "0.1", "--backoff-max", "0.5", "--ping-interval", "0.5",
            "--ping-timeout", "1", "--max-attempts", "100", "--grace", "2", "-v",
        ]  # fmt: skip
        worker = WorkerProcess(args)
        await worker.start()
        conn = await asyncpg.connect(own_pg.dsn(user=PG_USER, password=PG_PASSWORD))
        try:
            outbox = Outbox(conn, schema)
            # SMTP server down: connections refused.
            smtp_proxy.refuse = True
            await outbox.enqueue_emails(3)
            await worker.wait_for_log("SMTP connect", timeout=30)
            # SMTP server back, but the password is wrong: 535 after STARTTLS.
            smtp_proxy.refuse = False
            await smtp.wait_until(lambda: bool(smtp.auth_attempts), timeout=30, what="AUTH")
            await worker.wait_for_log("535", timeout=30)
            # Database down: every connection reset, new ones refused.
            pg_proxy.refuse = True
            pg_proxy.cut()
            await worker.wait_for_log("database unavailable", timeout=30)
            pg_proxy.refuse = False
            # Back: the failed attempts get recorded (their errors are what we check).
            await wait_until(
                lambda: conn.fetchval(
                    f"SELECT count(*) = 3 FROM \"{schema}\".intent WHERE last_error LIKE '%535%'"
                ),
                timeout=60,
            )
            errors = [r["last_error"] for r in await conn.fetch(f'SELECT * FROM "{schema}".intent')]
        finally:
            await conn.close()
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout=30) == 0, worker.tail()
        code, status = await cli("status", "--dsn", dsn, "--schema", schema)
        assert code == 0, status
    output = worker.output
    assert "535" in output and "database unavailable" in output
    # Tracebacks may appear (asyncpg logs its pool's reconnect failures with one); the
    # search below covers them like every other line.
    assert leaks(output) == [], [ln.text for ln in worker.lines if leaks(ln.text)][:5]
    assert leaks("\n".join(errors)) == [], errors
    assert leaks(status) == [], status


async def test_a_handlers_module_named_like_the_password_is_logged_as_it_is(
    pg_dsn: str, db: asyncpg.Connection, schema: str, tmp_path
):
    """Secrets are masked where they stand (the DSN), not wherever their text appears."""
    (tmp_path / "h_secretword.py").write_text(
        "from worker import Handlers\nhandlers = Handlers()\n\n\n"
        "@handlers.register('noop')\nasync def noop(intent):\n    pass\n"
    )
    async with login_roles(db, pg_dsn, "app") as [role]:
        await db.execute(f"ALTER ROLE \"{role.name}\" PASSWORD 'secretword'")
        await db.execute(grants_sql(schema, role.name, None))
        dsn = dsn_as(pg_dsn, role.name, "secretword")
        args = ["run", "--dsn", dsn, "--schema", schema, "--log-format", "json"]
        args += ["--handlers", "h_secretword:handlers"]
        worker = WorkerProcess(args, env={"PYTHONPATH": f"{REPO}:{tmp_path}"})
        try:
            await worker.start()
            await worker.wait_for_log("your handlers (h_secretword:handlers)", timeout=30)
            await worker.ready()
        finally:
            await worker.aclose()
    assert "secretword" not in worker.output.replace("h_secretword", ""), worker.tail()
