"""Hostile input, property-based (Hypothesis), against the real PostgreSQL and SMTP server.

Invariants:
* a configured schema or channel name is either refused before anything runs, with a
  message naming what is wrong, or used exactly: the schema PostgreSQL has is that name
  (case, length and all) and notifications arrive on exactly that channel;
* an email payload whose fields carry CR, LF, NUL, other line breaks or encoded newlines
  either fails validation (the intent would be dead) or reaches the SMTP server with no
  header and no recipient beyond the ones the payload legitimately named.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
from datetime import UTC, datetime

import asyncpg
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.smtp_server import SmtpTestServer
from worker.cli.main import parse_args, settings_from
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.email import EmailSink, parse_smtp_url
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names, load_queries, quote_ident

EXAMPLES = int(os.environ.get("OUTBOX_FAULT_EXAMPLES", "60"))

# --- configuration names -------------------------------------------------------------------

_NAME_PIECES = ["a", "Z", "_", "0", "pg_", "PG_", '"', "'", ";", " ", "-", ".", "$", "\\", "é",
                "ß", "x" * 40]  # fmt: skip
names_strategy = st.one_of(
    st.lists(st.sampled_from(_NAME_PIECES), min_size=1, max_size=6).map("".join),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,70}", fullmatch=True),
    st.text(min_size=1, max_size=70).filter(lambda s: "\x00" not in s),
)


def _configure(schema: str, channel: str) -> Names | str:
    """What `outbox-worker run --schema=... --channel=...` makes of the names:
    the validated Names, or the error it stops with."""
    args = parse_args(["run", "--dsn", "postgresql://x@127.0.0.1:1/x",
                       f"--schema={schema}", f"--channel={channel}"])  # fmt: skip
    try:
        cfg = settings_from(args)
    except ConfigError as exc:
        return str(exc)
    return Names(cfg.schema, cfg.channel)


async def _used_exactly(conn: asyncpg.Connection, pg_dsn: str, names: Names) -> None:
    listener = await asyncpg.connect(pg_dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await migrate(conn, names)
        assert (
            await conn.fetchval("SELECT nspname FROM pg_namespace WHERE nspname = $1", names.schema)
            == names.schema
        )
        await listener.add_listener(
            names.channel, lambda _c, _p, channel, _m: got.put_nowait(channel)
        )
        q = load_queries(names)
        # An idle worker's flag makes the insert trigger notify: the rendered trigger and
        # the worker's LISTEN must agree on the exact channel.
        await conn.execute(q["declare_idle"], listener.get_server_pid(), "hypothesis")
        async with conn.transaction():
            await enqueue(conn, "noop", {}, schema=names.schema)
        assert await asyncio.wait_for(got.get(), timeout=10) == names.channel
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(names.schema)} CASCADE")
        await listener.close()


async def _check_names(pg_dsn: str, schema: str, channel: str | None) -> None:
    if channel is None:
        channel = f"{schema}_intent"
    outcome = _configure(schema, channel)
    event("refused" if isinstance(outcome, str) else "accepted")
    if isinstance(outcome, str):
        assert outcome.startswith(("invalid schema name", "invalid channel name")), outcome
        assert "\n" not in outcome and len(outcome) < 300
        return
    # Accepted: the names are exactly what was asked for, never trimmed or case-folded...
    assert (outcome.schema, outcome.channel) == (schema, channel)
    conn = await asyncpg.connect(pg_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            return  # someone else's schema (public, say): not ours to create and drop
        # ...and PostgreSQL takes them as they are.
        await _used_exactly(conn, pg_dsn, outcome)
    finally:
        await conn.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=names_strategy, channel=st.one_of(st.none(), names_strategy))
# Found by Hypothesis once, kept as fixed cases: a reserved prefix (was accepted, then
# failed at migrate), explicit empty names and argparse's "--" (silently became "outbox").
@example(schema="pg_", channel=None)
@example(schema="", channel=None)
@example(schema="--", channel="A")
@example(schema="Billing", channel="")
def test_configured_names_are_refused_clearly_or_used_exactly(pg_dsn: str, schema, channel):
    asyncio.run(_check_names(pg_dsn, schema, channel))


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=names_strategy, channel=st.one_of(st.none(), names_strategy))
def test_configured_names_soak(pg_dsn: str, schema, channel):
    asyncio.run(_check_names(pg_dsn, schema, channel))


# --- email fields --------------------------------------------------------------------------

_EVIL = [
    "\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\t",
    "=?utf-8?q?", "?=", "=0D=0A", "=?utf-8?b?DQpCY2M6IGV2aWxAZXZpbC50ZXN0?=",
    "=?utf-8?q?x=0D=0ABcc:_evil@evil.test?=", "Bcc: evil@evil.test", "X-Injected: 1",
    ",", ";", "<", ">", '"', "@", " ", "évil", "evil@evil.test", "\\", "%0d%0a",
]  # fmt: skip
hostile_text = st.lists(st.one_of(st.sampled_from(_EVIL), st.text(max_size=4)), max_size=8).map(
    "".join
)
GOOD = ["alice@example.com", "bob@example.org", "carol@mail.example.net"]
good_address = st.sampled_from(GOOD)
address = st.one_of(
    good_address,
    hostile_text,
    st.tuples(hostile_text, good_address).map(lambda p: f"{p[0]} <{p[1]}>"),
    st.tuples(good_address, hostile_text).map(lambda p: p[0] + p[1]),
)
addresses = st.one_of(address, st.lists(address, max_size=3))
payloads = st.fixed_dictionaries(
    {"to": addresses, "subject": hostile_text, "text": hostile_text},
    optional={
        "cc": addresses,
        "bcc": addresses,
        "reply_to": addresses,
        "from": address,
        "html": hostile_text,
        "headers": st.dictionaries(
            st.one_of(st.sampled_from(["X-Tag", "X-Injected", "Bcc"]), hostile_text),
            hostile_text,
            max_size=2,
        ),
    },
)
_BUILT = {"from", "to", "cc", "reply-to", "subject", "date", "message-id", "mime-version",
          "content-type", "content-transfer-encoding"}  # fmt: skip


def _field_text(payload: dict[str, object], *fields: str) -> str:
    parts: list[str] = []
    for f in fields:
        value = payload.get(f, [])
        parts.extend(value if isinstance(value, list) else [str(value)])  # type: ignore[arg-type]
    return "\n".join(parts)


async def _send(payload: dict[str, object]) -> tuple[bool, list]:
    async with SmtpTestServer() as server:
        sink = EmailSink(parse_smtp_url(server.url(tls="none")), "outbox@example.com", 1)
        now = datetime.now(UTC)
        intent = Intent(7, "email", payload, 1, 3, now, now)
        try:
            await sink.deliver(intent)
            sent = True
        except PermanentError:
            sent = False
        finally:
            await sink.aclose()
        return sent, list(server.messages)


def _check_payload(payload: dict[str, object]) -> None:
    sent, messages = asyncio.run(_send(payload))
    event("sent" if sent else "refused")
    if not sent:  # refused by validation: the intent would be dead, and nothing was sent
        assert messages == []
        return
    [msg] = messages
    # Recipients come from the address fields only, never from a subject or a header.
    named = _field_text(payload, "to", "cc", "bcc")
    assert all(rcpt in named for rcpt in msg.rcpt_tos), (msg.rcpt_tos, payload)
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    custom = payload.get("headers", {})
    assert isinstance(custom, dict)
    names = [k.lower() for k in parsed]
    assert set(names) <= _BUILT | {str(k).lower() for k in custom}, (names, payload)
    assert "bcc" not in names
    assert len(names) == len(set(names)), names  # no header twice
    for value in parsed.values():
        assert "\r" not in str(value) and "\n" not in str(value), (value, payload)
    # Every line of the header section is a field or the continuation of one.
    head = msg.data.split(b"\r\n\r\n", 1)[0]
    assert all(line[:1] in b" \t" or b":" in line for line in head.split(b"\r\n")), head


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(payload=payloads)
def test_email_fields_never_inject_a_header_or_recipient(payload: dict[str, object]):
    _check_payload(payload)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=5000, deadline=None)
@given(payload=payloads)
def test_email_fields_soak(payload: dict[str, object]):
    _check_payload(payload)
