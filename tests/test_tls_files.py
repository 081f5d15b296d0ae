"""A TLS file the configuration names (sslrootcert, sslcert, sslkey in the DSN or PGSSL*)
that is missing or unreadable is a configuration error: one line, exit 2, no waiting."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest

from tests.fault.workers import REPO, worker_env


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    # fail_after: a worker that took the error for an outage would wait forever.
    with anyio.fail_after(120):
        result = await anyio.run_process(
            [sys.executable, "-m", "worker", *args], check=False, env=worker_env(env), cwd=REPO
        )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def with_query(dsn: str, query: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}{query}"


@pytest.mark.parametrize("command", ["run", "status"])
async def test_a_missing_root_certificate_in_the_dsn_is_one_line(pg_dsn, schema, command):
    dsn = with_query(pg_dsn, "sslmode=verify-full&sslrootcert=/nonexistent/root.crt")
    code, output = await cli(command, "--dsn", dsn, "--schema", schema)
    assert code == 2, output
    [line] = output.strip().splitlines()
    assert "sslrootcert '/nonexistent/root.crt'" in line and "does not exist" in line, line


async def test_a_missing_client_certificate_from_the_environment_is_one_line(pg_dsn, schema):
    code, output = await cli(
        "run", "--dsn", pg_dsn, "--schema", schema, env={"PGSSLCERT": "/nonexistent/client.crt"}
    )
    assert code == 2, output
    [line] = output.strip().splitlines()
    assert "sslcert '/nonexistent/client.crt'" in line and "PGSSLCERT" in line, line


async def test_an_unreadable_root_certificate_or_key_is_one_line(pg_dsn, schema, tmp_path: Path):
    garbage = tmp_path / "root.crt"
    garbage.write_text("not a certificate\n")
    for query, expected in [
        (f"sslmode=require&sslrootcert={garbage}", "cannot be read"),
        (f"sslmode=require&sslkey={tmp_path}", "is not a file"),
    ]:
        code, output = await cli("run", "--dsn", with_query(pg_dsn, query), "--schema", schema)
        assert code == 2, output
        [line] = output.strip().splitlines()
        assert expected in line, line


async def test_files_are_not_read_when_tls_is_off(pg_dsn, schema, db):
    dsn = with_query(pg_dsn, "sslmode=disable&sslrootcert=/nonexistent/root.crt")
    code, output = await cli("status", "--dsn", dsn, "--schema", schema)
    assert code == 0, output
