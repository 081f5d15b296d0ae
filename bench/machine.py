"""The machine the figures come from: CPUs, load average, and how fast it flushes a file
(``pg_test_fsync``'s fdatasync rate: what one commit's WAL flush costs at best)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

_FDATASYNC = re.compile(r"^\s*fdatasync\s+([\d.]+)\s+ops/sec")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def at_start(data_directory: str | None) -> dict[str, Any]:
    """CPUs and the load average now (before the bench adds to it), then the fdatasync rate."""
    found = {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_average_at_start": os.getloadavg()}
    return found | fdatasync_rate(data_directory)


def _pg_test_fsync() -> str | None:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_test_fsync"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return str(candidates[-1]) if candidates else None


def _test_dir(data_directory: str | None) -> tuple[str | None, str]:
    """Where to put the test file: on the data directory's filesystem when it is local."""
    data = Path(data_directory) if data_directory else None
    if data is None or not data.is_dir():
        return None, "a temp file (the data directory is not on this machine)"
    tmp = Path(tempfile.gettempdir())
    if tmp.stat().st_dev == data.stat().st_dev:
        return str(tmp), "a temp file on the data directory's filesystem"
    if os.access(data.parent, os.W_OK):
        return str(data.parent), "a file next to the data directory"
    return None, "a temp file (not on the data directory's filesystem)"


def fdatasync_rate(data_directory: str | None) -> dict[str, Any]:
    """``pg_test_fsync -s 1``'s fdatasync ops/s (None if unavailable) and where it was
    measured. Stopped as soon as that line is out (the rest of its tests take ~15 s)."""
    tool = _pg_test_fsync()
    if tool is None:
        return {"fdatasync_per_s": None, "fdatasync_on": "n/a: pg_test_fsync not found"}
    where, what = _test_dir(data_directory)
    rate = None
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=where) as tmp:
        process = subprocess.Popen(
            [tool, "-s", "1", "-f", str(Path(tmp) / "fsync_test")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        watchdog = threading.Timer(30, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if match := _FDATASYNC.match(line):
                    rate = float(match[1])
                    break
        finally:
            watchdog.cancel()
            process.terminate()  # it removes its test file on SIGTERM
            process.wait()
    if rate is None:
        return {"fdatasync_per_s": None, "fdatasync_on": f"n/a: no fdatasync line from {tool}"}
    return {"fdatasync_per_s": rate, "fdatasync_on": what}
