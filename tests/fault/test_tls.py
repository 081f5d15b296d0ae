"""STARTTLS against a server whose certificate the worker does not trust, then does.

Invariant: with an untrusted certificate the worker never sends AUTH (nor any mail) and
the intent waits with the reason in ``last_error``; once told to trust the CA (``cafile=``)
it delivers over TLS, authenticated.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.conftest import wait_until
from tests.fault.ledger import check_ledger, delivered
from tests.smtp_server import SmtpTestServer

USER, PASSWORD = "mailer", "tls-test-password"


@pytest.mark.parametrize("tls", ["starttls", "opportunistic"])
async def test_untrusted_certificate_is_refused_before_auth(outbox, spawn, tls: str):
    async with SmtpTestServer(starttls=True, auth=(USER, PASSWORD)) as smtp:
        query = "" if tls == "opportunistic" else "?tls=starttls"
        url = f"smtp://{USER}:{PASSWORD}@{smtp.host}:{smtp.port}{query}"
        worker = await spawn(smtp_url=url, concurrency=2)
        [intent] = await outbox.enqueue_emails(1)

        async def failed_once() -> bool:
            return bool(
                await outbox.conn.fetchval(
                    f"SELECT last_error IS NOT NULL FROM {outbox.table} WHERE id = $1", intent
                )
            )

        await wait_until(failed_once, timeout=30)
        row = await outbox.conn.fetchrow(f"SELECT * FROM {outbox.table} WHERE id = $1", intent)
        assert smtp.connections >= 1  # it did try
        assert smtp.auth_attempts == []  # ...and never sent credentials
        assert smtp.messages == [] and smtp.transactions == 0
        assert row["status"] == "pending", row  # transient: a fixed certificate delivers it
        assert "certificate verify failed" in row["last_error"].lower(), row["last_error"]
        assert worker.running


async def test_trusted_ca_delivers_over_tls_with_auth(outbox, spawn):
    async with SmtpTestServer(starttls=True, require_starttls=True, auth=(USER, PASSWORD)) as smtp:
        url = (
            f"smtp://{USER}:{PASSWORD}@{smtp.host}:{smtp.port}"
            f"?tls=starttls&cafile={quote(smtp.cafile)}"
        )
        await spawn(smtp_url=url, concurrency=4)
        committed = await outbox.enqueue_emails(20)
        await outbox.wait_settled(timeout=30)
        await check_ledger(outbox, delivered(smtp), committed=committed)
        assert all(m.tls and m.auth_user == USER for m in smtp.messages)
        assert smtp.auth_attempts and all(a.tls for a in smtp.auth_attempts)
