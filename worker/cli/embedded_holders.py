"""Who holds the embedded server, and whose server it is: the holder list
(``PGDATA/.handle_pids.json``, pgserver's name and format), a ``postmaster.pid`` left by a
dead server, and the lock on the data directory that serialises starts and stops across
processes (see embedded.py for why we keep this bookkeeping ourselves).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path

import psutil

from worker.errors import ConfigError

_log = logging.getLogger("outbox.embedded")
_PIDS_FILE = ".handle_pids.json"  # pgserver's holder list; same name and format
_LOCK_TIMEOUT = 60.0  # a start by another process takes seconds; 60 s means it is stuck
_ORPHAN_TIMEOUT = 5.0  # backends of a killed postmaster exit on their own within ms


# --- holders (.handle_pids.json) -----------------------------------------------------------


def live_holders(pgdata: Path) -> list[int]:
    """Pids in the holder list that still belong to a running holder."""
    path = pgdata / _PIDS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    try:
        pids = [int(p) for p in json.loads(text or "[]")]
    except (ValueError, TypeError):
        # torn write by pgserver (it writes in place): the holders are unknown; forgetting
        # them beats refusing to start forever
        _log.warning("embedded PostgreSQL: unreadable %s, resetting it", path)
        return []
    return [pid for pid in dict.fromkeys(pids) if holder_alive(pid)]


def holder_alive(pid: int) -> bool:
    # A pid reused by an unrelated process counts as alive: the server then outlives its
    # holders until the next start/stop of ours, which is harmless. Telling reuse apart by
    # process age would rely on file mtimes, and a wall-clock step would then prune a live
    # holder and stop the server under it.
    if pid == os.getpid():
        return True
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied: cannot tell, keep it
        return True


def write_holders(pgdata: Path, pids: list[int]) -> None:
    path = pgdata / _PIDS_FILE
    if not path.exists() and not pids:
        return  # initdb needs an empty directory: create nothing before it ran
    text = json.dumps(pids)
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, unlike pgserver's own write


# --- stale postmaster.pid --------------------------------------------------------------------


def postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    return int(first) if first.isdigit() else None


def is_server(pid: int, pgdata: Path, *, unknown: bool = True) -> bool:
    """Is ``pid`` a live (non-zombie) PostgreSQL process running on ``pgdata``?

    ``unknown`` is the answer when the process may not be inspected (another user's).
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # the postmaster and every backend chdir() into the data directory
        return bool(proc.name().startswith("postgres") and Path(proc.cwd()) == pgdata)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied
        return unknown


def clear_stale_pidfile(pgdata: Path) -> None:
    """Remove postmaster.pid (and its socket lock) left by a server that is gone.

    PostgreSQL removes such a file itself only if its pid is free; after a crash or a
    container restart the pid may be a zombie or another process, and it then refuses to start.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
    except FileNotFoundError:
        return
    pid = postmaster_pid(pgdata)
    if pid is not None and is_server(pid, pgdata):
        return
    wait_for_orphans(pgdata)
    if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
        sock_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        try:
            # only if it names the same dead server (the socket dir may be shared, e.g. /tmp)
            if sock_lock.read_text().split("\n", 1)[0].strip() == str(pid):
                sock_lock.unlink()
        except OSError:
            pass
    pidfile.unlink(missing_ok=True)
    _log.info("embedded PostgreSQL: removed stale postmaster.pid (pid %s) in %s", pid, pgdata)


def wait_for_orphans(pgdata: Path) -> None:
    """Backends of a killed postmaster still attach its shared memory until they exit."""
    deadline = time.monotonic() + _ORPHAN_TIMEOUT
    while True:
        # our server runs as us (or, as root, as a user we may inspect): skip the others
        pids = [p.pid for p in psutil.process_iter() if is_server(p.pid, pgdata, unknown=False)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"embedded PostgreSQL: old server processes {pids} still run on {pgdata} "
                "without their postmaster; stop them and retry"
            )
        time.sleep(0.05)


class DirLock:
    """Exclusive flock on the data directory itself, across processes and threads.

    A directory, not a file in it: initdb needs the directory empty.
    """

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._pgdata, os.O_RDONLY)
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise ConfigError(
                        f"embedded PostgreSQL: timed out after {_LOCK_TIMEOUT:.0f} s waiting for "
                        f"another process starting or stopping the server in {self._pgdata}"
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)  # closing releases the flock
