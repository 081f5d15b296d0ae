"""Schema migration: idempotent, safe when run concurrently, shipped inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import asyncpg

from worker.migrate import migrate, schema_exists
from worker.sqlfiles import Names, migration_files

REPO = Path(__file__).resolve().parent.parent


async def test_migrate_twice_and_concurrently(pg_dsn: str, names: Names):
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        assert not await schema_exists(conns[0], names)
        async with anyio.create_task_group() as tg:  # four workers starting at once
            for conn in conns:
                tg.start_soon(migrate, conn, names)
        await migrate(conns[0], names)  # and once more, on an up-to-date schema
        assert await schema_exists(conns[0], names)
        triggers = await conns[0].fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
            f'"{names.schema}".intent',
        )
        assert triggers >= 1
    finally:
        for conn in conns:
            await conn.close()


def test_migration_files_are_schema_then_triggers_in_order():
    files = migration_files()
    assert files[0].name == "schema.sql"
    assert [f.name for f in files[1:]] == sorted(f.name for f in files[1:]) and len(files) > 1


def test_wheel_carries_the_sql(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("outbox_worker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "worker/_sql/schema.sql" in names
    for trigger in (REPO / "triggers").glob("*.sql"):
        assert f"worker/_sql/triggers/{trigger.name}" in names
    assert "worker/sql/relay.sql" in names
