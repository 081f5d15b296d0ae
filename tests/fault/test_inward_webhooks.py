"""Webhooks that point inward, against a real `outbox-worker run` process.

Invariant: with no flag, a webhook whose destination is loopback (by name or literal, IPv4,
IPv6 or IPv4-mapped), private, link-local (cloud metadata) or unspecified ends ``dead`` after
one attempt, with the address and the flag in its reason, and nothing reaches the receiver
on 127.0.0.1; the other intents are delivered as usual. A host named in
``--webhook-allow-hosts`` is reached (and only that one), as is loopback with
``OUTBOX_WEBHOOK_ALLOW_PRIVATE=1``; a redirect is still not followed.
"""

from __future__ import annotations

import orjson
import pytest

from tests.docs_text import doc_snippet
from tests.fault.ledger import Outbox, check_ledger, delivered
from tests.smtp_server import SmtpTestServer
from tests.test_sink_webhook import Receiver, Reply, webhook_receiver  # noqa: F401 (fixture)


async def _webhook(outbox: Outbox, url: str) -> int:
    return await outbox.enqueue("webhook", orjson.dumps({"url": url, "body": {}}).decode())


async def _dead_reasons(outbox: Outbox, ids: dict[str, int]) -> dict[str, tuple[int, str]]:
    rows = await outbox.rows()
    assert all(rows[i]["status"] == "dead" for i in ids.values()), rows
    return {url: (rows[i]["attempts"], rows[i]["last_error"]) for url, i in ids.items()}


@pytest.mark.timeout(180)
async def test_inward_webhooks_are_refused_unless_allowed(
    outbox: Outbox, smtp: SmtpTestServer, spawn, receiver: Receiver
) -> None:
    port = receiver.port
    metadata = "http://169.254.169.254/latest/meta-data/"
    inward_urls = [
        f"http://localhost:{port}/by-name",
        f"http://127.0.0.1:{port}/literal",
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        f"http://0.0.0.0:{port}/",
        "http://10.0.0.1/",
        metadata,
    ]
    emails = await outbox.enqueue_emails(20)
    inward = {url: await _webhook(outbox, url) for url in inward_urls}
    emails += await outbox.enqueue_emails(20)

    # No flag: every inward webhook is dead at once; the emails go out.
    worker = await spawn(smtp_url=smtp.url())
    await outbox.wait_settled(timeout=60)
    await check_ledger(
        outbox, delivered(smtp), committed=[*emails, *inward.values()], may_be_dead=inward.values()
    )
    reasons = await _dead_reasons(outbox, inward)
    assert {attempts for attempts, _ in reasons.values()} == {1}
    assert all(r.startswith("webhook destination ") for _, r in reasons.values()), reasons
    assert all("refused (allow with --webhook-allow-private" in r for _, r in reasons.values())
    assert reasons[f"http://localhost:{port}/by-name"][1].startswith(
        "webhook destination localhost resolves to 127.0.0.1 (loopback)"
    )
    assert receiver.requests == []
    # The page's example reason is the one the worker wrote.
    example = doc_snippet(
        "kinds/webhook.md", "Which hosts it may call", "", "webhook destination"
    ).text.strip()
    assert reasons[metadata][1] == example
    worker.terminate()
    assert await worker.wait(timeout=30) == 0, worker.tail()

    # A host named in --webhook-allow-hosts is reached even though it is loopback.
    worker = await spawn(smtp_url=smtp.url(), extra=["--webhook-allow-hosts", "localhost"])
    named = await _webhook(outbox, f"http://localhost:{port}/named")
    other = {"literal": await _webhook(outbox, f"http://127.0.0.1:{port}/not-named")}
    await outbox.wait_settled(timeout=60)
    assert (await outbox.rows())[named]["status"] == "sent"
    assert (await _dead_reasons(outbox, other))["literal"] == (
        1,
        "webhook host '127.0.0.1' is not in --webhook-allow-hosts",
    )
    assert [r.path for r in receiver.requests] == ["/named"]
    worker.terminate()
    assert await worker.wait(timeout=30) == 0, worker.tail()

    # OUTBOX_WEBHOOK_ALLOW_PRIVATE=1: loopback is reached; a redirect is still not followed.
    worker = await spawn(smtp_url=smtp.url(), env={"OUTBOX_WEBHOOK_ALLOW_PRIVATE": "1"})
    allowed = await _webhook(outbox, f"http://127.0.0.1:{port}/allowed")
    await outbox.wait_settled(timeout=60)
    assert (await outbox.rows())[allowed]["status"] == "sent"
    receiver.script.append(Reply(302, {"Location": metadata}, "moved"))
    moved = {"redirect": await _webhook(outbox, f"http://127.0.0.1:{port}/moved")}
    await outbox.wait_settled(timeout=60)
    attempts, reason = (await _dead_reasons(outbox, moved))["redirect"]
    assert attempts == 1 and reason.startswith(f"POST http://127.0.0.1:{port}: HTTP 302: moved")
    assert [r.path for r in receiver.requests] == ["/named", "/allowed", "/moved"]
    print(f"\ninward webhooks: {len(inward)} refused, {len(emails)} emails sent; reasons:")
    for url, (_, text) in reasons.items():
        print(f"  {url}: {text}")
