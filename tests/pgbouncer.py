"""PgBouncer in front of the test database, as most production PostgreSQL runs.

Debian's ``pgbouncer`` (1.18: no protocol-level prepared statements), started for the session
on a free port in transaction pooling mode, or session mode on request. Every database of the
server behind it is reachable through it under the same name. ``.ci/run`` installs the
package; elsewhere its tests are skipped with one line (they fail in CI).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from tests.services import missing, stop_process
from tests.tcp_proxy import free_port

_BINARY = "/usr/sbin/pgbouncer"
_START_TIMEOUT = 30.0


class PgBouncer:
    """One running pgbouncer. ``dsn(url)``: the same database as ``url``, through the pooler;
    ``admin(command)``: a command on its admin console (``RECONNECT``, ``KILL db``, ``SHOW``)."""

    def __init__(
        self, server_dsn: str, workdir: Path, pool_mode: str, settings: dict[str, str]
    ) -> None:
        self.port = free_port()
        parts = urlsplit(server_dsn)
        query = parse_qs(parts.query)
        # The server behind: TCP host and port, or the embedded server's socket directory.
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        port = query.get("port", [str(parts.port or 5432)])[0]
        self.user = parts.username or "postgres"
        self._workdir = workdir
        users = workdir / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        self.ini = workdir / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            f"pool_mode = {pool_mode}\nadmin_users = {self.user}\n"
            "max_client_conn = 500\ndefault_pool_size = 20\n"
            # A server connection lent out must be given back promptly in these tests.
            "server_reset_query = DISCARD ALL\nserver_check_delay = 0\n"
            + "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        for path in (workdir, users, self.ini):  # read by the user it runs as (root: nobody)
            path.chmod(0o755 if path.is_dir() else 0o644)
        self._log = workdir / "pgbouncer.log"
        command = [_BINARY, self.ini.name]
        if os.geteuid() == 0:  # it refuses to run as root
            command[1:1] = ["-u", "nobody"]
        self._out = self._log.open("w")
        self.proc = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def dsn(self, url: str) -> str:
        """``url``'s database (and user) through the pooler."""
        parts = urlsplit(url)
        netloc = f"{parts.username or self.user}@127.0.0.1:{self.port}"
        return urlunsplit(("postgresql", netloc, parts.path or "/postgres", "", ""))

    async def admin(self, command: str) -> list[asyncpg.Record]:
        """A command on the admin console (the pseudo-database ``pgbouncer``; simple query
        protocol only, so no prepared statements and no type introspection)."""
        conn = await asyncpg.connect(
            f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer", statement_cache_size=0
        )
        try:
            if command.split()[0].upper() == "SHOW":
                return list(await conn.fetch(command))
            await conn.execute(command)
            return []
        finally:
            conn.terminate()

    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._out.close()


@contextlib.contextmanager
def pgbouncer(
    server_dsn: str, pool_mode: str = "transaction", **settings: str
) -> Iterator[PgBouncer]:
    """A pgbouncer for the session; ``settings`` are more lines of its [pgbouncer] section."""
    if not Path(_BINARY).exists() and shutil.which("pgbouncer") is None:
        missing(
            "PgBouncer is not installed: apt-get install pgbouncer (Debian's package; "
            ".ci/run installs it)"
        )
    with tempfile.TemporaryDirectory(prefix="outbox-pgbouncer-") as tmp:
        bouncer = PgBouncer(server_dsn, Path(tmp), pool_mode, settings)
        try:
            yield bouncer
        finally:
            bouncer.stop()
