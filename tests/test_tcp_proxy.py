"""The test proxy in front of the embedded PostgreSQL, which listens on a Unix socket only:
the network-fault tests (tests/fault/test_network.py) use it on a machine without a server."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.tcp_proxy import TcpProxy
from worker.cli.embedded import start_embedded


async def test_a_proxy_to_the_embedded_servers_unix_socket(tmp_path: Path) -> None:
    with start_embedded(tmp_path / "pgdata") as embedded:
        assert "host=/" in embedded.dsn
        async with TcpProxy.to_postgres(embedded.dsn) as proxy:
            dsn = proxy.rewrite(embedded.dsn)
            assert dsn == f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT inet_server_addr()") is None  # the socket
                proxy.cut()
                with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError)):
                    await conn.fetchval("SELECT 1")
            finally:
                conn.terminate()
            assert proxy.connections == 1


def test_rewrite_keeps_other_query_parameters() -> None:
    proxy = TcpProxy.to_postgres("postgresql://u:p@db.example:6543/app?sslmode=disable")
    assert proxy.target == ("db.example", 6543) and proxy.target_path is None
    proxy.port = 7000
    assert proxy.rewrite("postgresql://u:p@/app?host=/run/pg&port=6543&sslmode=disable") == (
        "postgresql://u:p@127.0.0.1:7000/app?sslmode=disable"
    )
