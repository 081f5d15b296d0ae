"""Connections: the pool every runtime query uses, and clear start-up errors."""

from __future__ import annotations

import ssl
from typing import Any

import asyncpg
import orjson

from worker.errors import ConfigError, DatabaseUnavailable
from worker.logs import one_line, redact_url
from worker.store.tls import check_tls_files

# Errors that mean "the database can't serve us right now" (down, restarting, failing
# over to a replica that is still read-only, out of connections, cancelled by an
# operator): retry with backoff, never crash the worker.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused by every host, reset, unreachable, DNS
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # CannotConnectNowError (starting up, shutting down, in recovery), AdminShutdownError...
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    # A write on a server that became a standby, or was set read-only, since we connected.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # Every host of a multi-host DSN answered but none is read-write
    # (target_session_attrs=read-write): a failover is under way.
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    # The client's protocol state is broken ("cannot switch to state 12; another operation
    # (2) is in progress"): seen when a server restart hits a statement half-way. The
    # connection is useless, the database may be fine: reconnect, as after any loss.
    asyncpg.exceptions.InternalClientError,
)

# Caught by DB_UNAVAILABLE (they subclass InterfaceError or OSError) yet no wait will fix
# them: the operator must. Wrong passwords and unknown databases are PostgresErrors outside
# DB_UNAVAILABLE already.
_MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ClientConfigurationError,  # a bad DSN parameter
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
    ssl.SSLCertVerificationError,  # the server's certificate does not verify
)


def unavailable(exc: BaseException) -> bool:
    """Will waiting help? True for an outage, False for a configuration error."""
    return isinstance(exc, DB_UNAVAILABLE) and not isinstance(exc, _MISCONFIGURED)


# Bounds a query on a frozen (half-open) connection; the caller then retries.
COMMAND_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10.0

# Every connection but the claim loop's and the outcome writer's (whose statements are hot and
# which know whether a pooler is in the way: worker/store/connection.py) prepares unnamed
# statements only (statement_cache_size=0): a named one outlives its transaction, and behind a
# transaction pooler (PgBouncer, Supavisor, RDS Proxy) the next transaction may run on another
# server connection ("prepared statement does not exist") or meet another client's ("already
# exists").

# A pooler refuses a startup parameter it does not track (PgBouncer: "unsupported startup
# parameter: enable_sort"); PostgreSQL itself takes any setting this way.
POOLER_REFUSAL = "unsupported startup parameter"
# A named statement that vanished or collided: a transaction pooler that let the startup
# parameters through (PgBouncer's ignore_startup_parameters) hands out server connections.
POOLED_STATEMENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidSQLStatementNameError,
    asyncpg.exceptions.DuplicatePreparedStatementError,
)


def refused_by_pooler(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and POOLER_REFUSAL in str(exc)


async def behind_pooler(dsn: str) -> bool:
    """Whether connections to ``dsn`` go through a pooler that refuses session settings: one
    connection that asks for a harmless one. False when it cannot tell (the connection failed
    for another reason: the caller's own connections will say why)."""
    try:
        conn = await asyncpg.connect(
            dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"enable_sort": "on"},
            statement_cache_size=0,
        )
    except Exception as exc:
        return refused_by_pooler(exc)
    conn.terminate()
    return False


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        format="text",
    )


async def create_pool(dsn: str, *, max_size: int, application_name: str) -> asyncpg.Pool:
    """Open the pool, failing fast with one clear line if the database can't be reached."""
    check_tls_files(dsn)  # a missing file is the operator's to fix, not an outage
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            init=init_connection,
            command_timeout=COMMAND_TIMEOUT,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": application_name},
            statement_cache_size=0,
        )
    except Exception as exc:
        raise _connect_failure(dsn, exc) from None
    assert pool is not None
    return pool


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    check_tls_files(dsn)
    try:
        kwargs.setdefault("statement_cache_size", 0)
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, **kwargs)
    except Exception as exc:
        raise _connect_failure(dsn, exc) from None
    await init_connection(conn)
    return conn


def connect_error(dsn: str, exc: BaseException) -> str:
    return f"cannot connect to PostgreSQL at {redact_url(dsn)}: {one_line(exc)}"


def _connect_failure(dsn: str, exc: BaseException) -> ConfigError:
    """One line either way; ``DatabaseUnavailable`` (a ConfigError) when waiting may help."""
    return (DatabaseUnavailable if unavailable(exc) else ConfigError)(connect_error(dsn, exc))
