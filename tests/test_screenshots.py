"""bench.screenshots, so the docs' dashboard pictures can always be taken again: a short
real demo run, staged as for the trouble picture, printed into an SVG."""

from __future__ import annotations

import html
import os
from dataclasses import replace

import asyncpg
import pytest

from bench.screenshots import PICTURES, take


@pytest.mark.timeout(90)
async def test_the_trouble_picture_is_the_dashboard_of_a_real_run(pg_dsn: str) -> None:
    schema = f"outbox_demo_{os.urandom(4).hex()}"  # the demo's guard wants this prefix
    staged = PICTURES["dashboard-trouble"]
    picture = replace(staged, seconds=4.0, options=replace(staged.options, schema=schema))
    try:
        svg = await take(pg_dsn, picture, 100, 30)
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    text = html.unescape(svg).replace("\xa0", " ")  # rich writes spaces as &#160;
    assert svg.startswith("<svg") and picture.caption in text
    assert "Slots 2/2 busy" in text  # the picture's 2 slots, busy with the backlog
    assert "email" in text  # a kind the demo delivered, in the kinds table
    assert "oldest xact" in text  # the health read ran, and saw the held transaction
