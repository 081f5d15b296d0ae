"""For the `--http` tests: plain GETs, and a real Prometheus server (Debian's `prometheus`)
that the test configures and starts itself.

Without the binary the tests skip with one line; with CI set they fail (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.tcp_proxy import free_port


def require_binary(name: str, package: str = "prometheus") -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


async def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); a refused or reset connection is (0, the error)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return 0, repr(exc)


async def wait_for_status(url: str, status: int, timeout: float = 30.0) -> str:
    """Poll ``url`` until it answers ``status``; returns the body."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        last = await http_get(url)
        if last[0] == status:
            return last[1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} never answered {status} in {timeout}s; last: {last}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` evaluates to now (/api/v1/query)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(f"{self.url}/api/v1/query", params={"query": promql}) as response,
        ):
            body = await response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def by_label(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in await self.query(promql)}


@contextlib.asynccontextmanager
async def prometheus_server(config: dict[str, Any], workdir: Path) -> AsyncIterator[Prometheus]:
    """Prometheus with ``config`` (prometheus.yml as a dict)."""
    binary = require_binary("prometheus")
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_for_status(f"{url}/-/ready", 200, timeout=60)
        except AssertionError:
            raise AssertionError(log_path.read_text(errors="replace")[-3000:]) from None
        yield Prometheus(url)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
