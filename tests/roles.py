"""Non-superuser roles made per test (dropped after): a login role with a password of its
own, and a DSN for it on the test database."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg


@dataclass(frozen=True)
class Role:
    name: str
    dsn: str


def dsn_as(dsn: str, user: str, password: str) -> str:
    """``dsn`` with its user and password replaced (host, port, database and query kept)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password, safe='')}@{host}"))


@contextlib.asynccontextmanager
async def login_roles(
    admin: asyncpg.Connection, dsn: str, *kinds: str
) -> AsyncIterator[list[Role]]:
    """One new LOGIN role per ``kinds`` entry (its name starts with it), no privileges but
    PUBLIC's; each is dropped with everything granted to it when the block ends."""
    roles = []
    for kind in kinds:
        name, password = f"{kind}_{secrets.token_hex(4)}", secrets.token_hex(12)
        # ALTER/CREATE ROLE take no bind parameter for a password: a hex literal is safe.
        await admin.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
        roles.append(Role(name, dsn_as(dsn, name, password)))
    try:
        yield roles
    finally:
        for role in roles:
            await admin.execute(f'DROP OWNED BY "{role.name}"')
            await admin.execute(f'DROP ROLE "{role.name}"')
