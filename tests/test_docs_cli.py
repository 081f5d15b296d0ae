"""The getting-started page's command-line snippets, run as written (only the addresses are the
test's own), and the pages' tables of flags checked against the parser."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest

from tests.conftest import wait_until
from tests.docs_text import DOCS, doc_snippet, page_path
from tests.smtp_server import SmtpTestServer
from worker.cli.options import run_options
from worker.producer import enqueue
from worker.store.migrate import schema_exists
from worker.store.sqlfiles import Names

REPO = Path(__file__).resolve().parent.parent
RUN_THE_WORKER = doc_snippet("getting-started.md", "Run the worker", "sh").text
# The same steps on two pages: the README's quick start and the getting-started page.
OWN_DATABASE = {
    page: (doc_snippet(page, heading, "sh", "export").text, doc_snippet(page, heading, "sql").text)
    for page, heading in [
        ("README.md", "Quick start"),
        ("getting-started.md", "Against your own database"),
    ]
}


@pytest.fixture
def quick_start_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose .venv is the environment running the tests, as after the Quick
    start's `python3 -m venv .venv && .venv/bin/pip install ...`."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the page's `source .venv/bin/activate` needs the tests in a virtualenv")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    yield tmp_path


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


@pytest.mark.parametrize("page", sorted(OWN_DATABASE))
async def test_against_your_own_database(
    quick_start_dir: Path, pg_dsn: str, names: Names, conn, page: str
):
    """The export, migrate and worker lines, then the application's transaction."""
    shell, sql = OWN_DATABASE[page]
    lines = shell.strip().splitlines()
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
            await conn.execute(sql.replace("outbox.", f'"{names.schema}".'))
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


def _flag_rows() -> list[tuple[str, str, str]]:
    """(page, flags cell, variables cell) of every table row, on every page and the README,
    that starts with a flag."""
    pages = ["README.md", *(p.relative_to(DOCS).as_posix() for p in sorted(DOCS.rglob("*.md")))]
    return [
        (page, *line.split("|")[1:3])
        for page in pages
        if not page.startswith("reference/")  # generated from the parser: checked apart
        for line in page_path(page).read_text().splitlines()
        if line.startswith("| `--")
    ]


def test_every_flag_table_names_real_flags_and_their_variables():
    """A hand-written table of flags (the short one in operating/running.md) says what the
    parser says: each flag exists, and its variable is the flag's own."""
    env = {opt.flag: opt.env for opt in run_options()} | {"--dsn": "DATABASE_URL"}
    rows = _flag_rows()
    assert rows, "no flag table found"
    for page, flags, variables in rows:
        names = re.findall(r"`([A-Z_]+)(?:=1)?`", variables)
        for flag in re.findall(r"`(--[a-z-]+)`", flags):
            assert flag in env, f"{page}: {flag} is not a flag of run"
            # `_DEAD` after `OUTBOX_RETAIN_SENT` stands for its sibling's variable.
            assert any(
                env[flag] == name or (name.startswith("_") and env[flag].endswith(name))
                for name in names
            ), f"{page}: {flag} is set by {env[flag]}, the table says {names}"
