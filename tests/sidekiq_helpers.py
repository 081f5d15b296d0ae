"""Redis for the sidekiq tests: the server (or a one-line skip), an empty database of a
test's own."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as redis

from tests import services

REDIS_URL = os.environ.get("OUTBOX_TEST_REDIS_URL", services.REDIS_URL)
redis_or_skip = services.redis_url  # the URL once Redis answers; else one line: skip (fail in CI)


@dataclass
class RedisDb:
    url: str
    client: redis.Redis


@pytest.fixture
async def redis_db() -> AsyncIterator[RedisDb]:
    """An empty Redis database (1-15) of this test's own, for a whole Sidekiq app's fixed key
    names (the "default" queue, the schedule set, Sidekiq's stats); emptied afterwards."""
    parts = urlsplit(redis_or_skip())
    for db in random.sample(range(1, 16), 15):
        url = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.Redis.from_url(url)
        # SETNX on an empty database: two tests cannot both take it.
        if await client.dbsize() == 0 and await client.setnx("outbox-test:taken", 1):
            try:
                yield RedisDb(url, client)
            finally:
                await client.flushdb()
                await client.aclose()
            return
        await client.aclose()
    pytest.fail("no empty Redis database among 1-15 for this test")
