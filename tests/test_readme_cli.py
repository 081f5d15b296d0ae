"""The README's command-line snippets, run as written (only the addresses are the test's own),
and its table of worker flags checked against the parser."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import wait_until
from tests.smtp_server import SmtpTestServer
from worker.cli.options import run_options
from worker.producer import enqueue
from worker.store.migrate import schema_exists
from worker.store.sqlfiles import Names

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def readme_block(marker: str, lang: str = "sh") -> str:
    """The first ```LANG block after the text ``marker`` in the README."""
    section = README[README.index(marker) :]
    start = section.index(f"```{lang}\n") + len(f"```{lang}\n")
    return section[start : section.index("```", start)]


RUN_THE_WORKER = readme_block("Run the worker (on a machine")
OWN_DATABASE = readme_block("Against your own database:")
OWN_DATABASE_SQL = readme_block("and in the application, inside its own transaction", "sql")


@pytest.fixture
def quick_start_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose .venv is the environment running the tests, as after the Quick
    start's `python3 -m venv .venv && .venv/bin/pip install ...`."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's `source .venv/bin/activate` needs the tests in a virtualenv")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    yield tmp_path


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def start_snippet(script: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Run the snippet's lines in bash; its last line (the worker) replaces bash, so that the
    test's SIGTERM reaches the worker. PATH has no outbox-worker: the snippet must find it."""
    *lines, worker = script.strip().splitlines()
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    base.pop("DATABASE_URL", None)
    base.update(env, PATH="/usr/bin:/bin", PYTHONPATH=str(REPO))
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.Popen(
        [bash, "-e", "-c", "\n".join([*lines, f"exec {worker}"])],
        cwd=cwd,
        env=base,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait for a clean exit, return the output."""
    proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        while proc.poll() is None:  # noqa: ASYNC110 - a subprocess's exit sets no event
            await anyio.sleep(0.05)
    output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, output
    return output


async def test_run_the_worker(quick_start_dir: Path, pg_dsn: str, names: Names, conn):
    assert RUN_THE_WORKER.strip().splitlines()[0] == "source .venv/bin/activate"
    env = {
        "DATABASE_URL": pg_dsn,
        "OUTBOX_SCHEMA": names.schema,
        "OUTBOX_MIGRATE": "1",  # an embedded database is migrated by itself; this one is not
        "OUTBOX_HANDLERS": "tests.sample_handlers:handlers",
    }
    proc = start_snippet(RUN_THE_WORKER, quick_start_dir, env)
    try:
        await wait_until(lambda: schema_exists(conn, names), timeout=60)
        await enqueue(conn, "noop", {}, schema=names.schema)
        await wait_until(lambda: _all_sent(conn, names), timeout=60)
    finally:
        output = await stop(proc)
    assert "8 delivery slots" in output


async def test_against_your_own_database(quick_start_dir: Path, pg_dsn: str, names: Names, conn):
    """The export, migrate and worker lines, then the application's transaction."""
    lines = OWN_DATABASE.strip().splitlines()
    assert lines[0].startswith("export DATABASE_URL=")
    async with SmtpTestServer(starttls=True, auth=("mailer", "secret")) as smtp:
        url = smtp.url(user="mailer", password="secret", tls="starttls", cafile=smtp.cafile)
        script = "\n".join(
            [
                "source .venv/bin/activate",
                f"export DATABASE_URL='{pg_dsn}'",
                *lines[1:-1],
                re.sub(r"--smtp-url '[^']*'", f"--smtp-url '{url}'", lines[-1]),
            ]
        )
        assert url in script and "smtp.internal" not in script
        proc = start_snippet(script, quick_start_dir, {"OUTBOX_SCHEMA": names.schema})
        try:
            await wait_until(lambda: schema_exists(conn, names), timeout=60)
            await conn.execute(f'CREATE TABLE "{names.schema}".users (email text)')
            await conn.execute(f'SET search_path TO "{names.schema}"')
            await conn.execute(OWN_DATABASE_SQL.replace("outbox.", f'"{names.schema}".'))
            [message] = await smtp.wait_for_messages(1, accepted=True, timeout=60)
            await wait_until(lambda: _all_sent(conn, names), timeout=60)
        finally:
            output = await stop(proc)
    assert f"schema {names.schema} created" in output  # printed by the migrate line
    assert message.rcpt_tos == ("a@example.com",)
    assert (message.message["Subject"], message.message.get_content().strip()) == ("Welcome", "Hi")


async def _all_sent(conn: asyncpg.Connection, names: Names) -> bool:
    rows = await conn.fetch(f'SELECT status FROM "{names.schema}".intent')
    return [r["status"] for r in rows] == ["sent"]


def test_the_flag_table_lists_every_worker_flag_with_its_variable():
    section = README[README.index("## Running it") : README.index("## Dashboard")]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `--")]
    table = {
        flag: re.findall(r"`([A-Z_*]+)(?:=1)?`", variables)
        for flags, variables in rows
        for flag in re.findall(r"`(--[a-z-]+)`", flags)
    }
    for opt in run_options():
        # `OUTBOX_PING_*` stands for a family; `_MAX` after `OUTBOX_BACKOFF_BASE` for its sibling.
        assert any(
            opt.env == name
            or (name.endswith("*") and opt.env.startswith(name[:-1]))
            or (name.startswith("_") and opt.env.endswith(name))
            for name in table.get(opt.flag, [])
        ), (opt.flag, opt.env)
    known = {opt.flag for opt in run_options()} | {"--log-format", "--dashboard", "--no-dashboard"}
    assert set(table) == known
