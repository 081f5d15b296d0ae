"""Poison intents among good ones: payloads that fail validation, a handler that raises
every time, a handler that kills its own process.

Invariant: each poison intent ends ``dead`` with a reason after its configured attempts
(validation failures after one; the process killer after ``max_attempts`` crashes, since
a rescue counts as an attempt), and every good intent is sent, duplicates only among
those in flight when a worker died. The test restarts the worker whenever it dies, as a
service manager would; nothing else helps it.
"""

from __future__ import annotations

import anyio
import orjson

from tests.fault.ledger import Fault, check_ledger, delivered
from tests.fault.workers import WorkerProcess

INVALID_EMAILS = {
    "not an object": ["a@example.com"],
    "no recipient": {"subject": "hi", "text": "x"},
    "bad address": {"to": "not an address", "text": "x"},
    "CRLF in subject": {"to": "a@example.com", "subject": "hi\r\nBcc: evil@example.com"},
    "encoded newline": {"to": "a@example.com", "subject": "=?utf-8?q?hi=0D=0ABcc:_e@x.com?="},
    "unknown field": {"to": "a@example.com", "bcc_all": True},
}


async def test_poison_ends_dead_and_good_intents_are_unaffected(outbox, smtp, spawn):
    good = await outbox.enqueue_emails(150)
    invalid = {
        name: await outbox.enqueue("email", orjson.dumps(payload).decode())
        for name, payload in INVALID_EMAILS.items()
    }
    boom = await outbox.enqueue("boom", "{}", max_attempts=3)
    crash = await outbox.enqueue("crash", "{}", max_attempts=2)
    good += await outbox.enqueue_emails(150)

    async def start() -> WorkerProcess:
        return await spawn(smtp_url=smtp.url(), concurrency=8, lease=3.0)

    worker = await start()
    faults: list[Fault] = []
    with anyio.fail_after(90):
        while not await outbox.settled():
            if not worker.running:  # killed by the crash handler: restart it
                assert await worker.wait(timeout=10) == -9, worker.tail()
                held = await outbox.processing(locked_by_pid=worker.pid)
                faults.append(Fault("handler killed its worker", held))
                worker = await start()
            await anyio.sleep(0.1)  # supervising a process: poll it, as systemd would
    rows = await outbox.rows()
    report = await check_ledger(
        outbox,
        delivered(smtp),
        committed=[*good, *invalid.values(), boom, crash],
        faults=faults,
        may_be_dead={*invalid.values(), boom, crash},
        tracked_kinds=("email",),
    )
    print(
        f"\npoison among {len(good)} good intents: {report.line()}, workers killed: {len(faults)}"
    )

    def crashes_seen(intent_id: int) -> int:  # a rescue after a crash is an attempt too
        return sum(intent_id in f.in_flight for f in faults)

    for name, intent_id in invalid.items():
        expected = ("dead", 1 + crashes_seen(intent_id))
        assert (rows[intent_id]["status"], rows[intent_id]["attempts"]) == expected, name
    assert rows[boom]["attempts"] == 3
    assert rows[boom]["last_error"].startswith("attempts exhausted")
    assert "RuntimeError: handler bug" in rows[boom]["last_error"] or crashes_seen(boom)
    assert rows[crash]["attempts"] == 2 and len(faults) == 2
    assert "attempts exhausted" in rows[crash]["last_error"]
    assert "lease expired" in rows[crash]["last_error"]
    assert report.counts == {"sent": len(good), "dead": len(invalid) + 2}
    # Nothing of the invalid payloads reached the server.
    assert not any(b"evil" in m.data or b"e@x.com" in m.data for m in smtp.messages)
    assert all(len(m.rcpt_tos) == 1 for m in smtp.messages)
