"""Email end to end: producer commit -> relay -> EmailSink -> a real SMTP server."""

from __future__ import annotations

from tests.conftest import wait_until
from tests.smtp_server import Script, SmtpTestServer, reply
from worker.producer import enqueue
from worker.sinks.email import EmailSink, parse_smtp_url
from worker.store.sqlfiles import Names

WELCOME = {
    "to": ["Ann <ann@example.com>"],
    "bcc": "audit@example.com",
    "subject": "Welcome",
    "text": "Hi Ann",
    "html": "<p>Hi Ann</p>",
    "headers": {"X-Campaign": "welcome"},
}


def _sink(server: SmtpTestServer) -> EmailSink:
    return EmailSink(parse_smtp_url(server.url()), "Shop <shop@example.org>", max_connections=4)


async def _row(db, names: Names, intent_id: int):
    return await db.fetchrow(f'SELECT * FROM "{names.schema}".intent WHERE id = $1', intent_id)


async def test_committed_email_arrives_with_its_headers_and_message_id(
    db, names: Names, start_relay
):
    async with SmtpTestServer() as server:
        sink = _sink(server)
        async with start_relay({"email": sink}):
            async with db.transaction():
                intent_id = await enqueue(db, "email", WELCOME, schema=names.schema)
            await server.wait_for_messages(1, accepted=True)
            await wait_until(lambda: _status_is(db, names, intent_id, "sent"))
        await sink.aclose()
    [msg] = server.accepted
    assert msg.mail_from == "shop@example.org"
    assert sorted(msg.rcpt_tos) == ["ann@example.com", "audit@example.com"]
    assert msg.message["Message-ID"] == f"<outbox-{intent_id}@example.org>"
    assert msg.message["Subject"] == "Welcome" and msg.message["X-Campaign"] == "welcome"
    assert "Bcc" not in msg.message
    row = await _row(db, names, intent_id)
    assert row["attempts"] == 1 and row["sent_at"] is not None


async def test_transient_replies_are_retried_then_sent(db, names: Names, start_relay):
    async with SmtpTestServer() as server:
        server.script(Script(data=reply(451)), Script(mail=reply(421)))
        sink = _sink(server)
        async with start_relay({"email": sink}):
            async with db.transaction():
                intent_id = await enqueue(db, "email", WELCOME, schema=names.schema)
            await wait_until(lambda: _status_is(db, names, intent_id, "sent"))
        await sink.aclose()
    row = await _row(db, names, intent_id)
    assert row["attempts"] == 3 and "SMTP 421" in row["last_error"]
    assert len(server.accepted) == 1


async def test_rejections_and_poison_payloads_are_dead_and_block_nothing(
    db, names: Names, start_relay
):
    poison = [
        ["not", "an", "object"],
        {"subject": "no recipient", "text": "x"},
        {"to": "not an address", "subject": "s", "text": "x"},
        {"to": "a@example.com", "subject": "Hi\r\nBcc: victim@example.com", "text": "x"},
        {"to": "a@example.com", "subject": "s", "text": "x", "headers": {"X-A": "1\n2"}},
    ]
    async with SmtpTestServer() as server:
        server.script(Script(rcpt=reply(550)))
        sink = _sink(server)
        async with start_relay({"email": sink}, concurrency=1):
            async with db.transaction():
                rejected = await enqueue(db, "email", WELCOME, schema=names.schema)
                bad = [await enqueue(db, "email", p, schema=names.schema) for p in poison]
                good = [
                    await enqueue(db, "email", {**WELCOME, "subject": f"n{n}"}, schema=names.schema)
                    for n in range(5)
                ]
            await wait_until(lambda: _status_is(db, names, good[-1], "sent"))
            for intent_id in [rejected, *bad, *good]:
                await wait_until(lambda i=intent_id: _settled(db, names, i))
        await sink.aclose()
    rows = {i: await _row(db, names, i) for i in [rejected, *bad, *good]}
    assert rows[rejected]["status"] == "dead" and "550" in rows[rejected]["last_error"]
    assert rows[rejected]["attempts"] == 1
    for intent_id in bad:
        assert rows[intent_id]["status"] == "dead" and rows[intent_id]["attempts"] == 1
        assert rows[intent_id]["last_error"]
    assert all(rows[i]["status"] == "sent" for i in good)
    # Nothing of the poison reached the server, and no injected recipient either.
    assert {m.message["Subject"] for m in server.accepted} == {f"n{n}" for n in range(5)}
    assert all("victim@example.com" not in m.rcpt_tos for m in server.messages)


async def _status_is(db, names: Names, intent_id: int, status: str) -> bool:
    return bool((await _row(db, names, intent_id))["status"] == status)


async def _settled(db, names: Names, intent_id: int) -> bool:
    return (await _row(db, names, intent_id))["status"] in ("sent", "dead")
