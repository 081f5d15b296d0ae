"""A handler that blocks the event loop, in a relay running in this test's loop: the loop
watchdog names it, the other intents are still delivered once each; and a plain function
registered with ``threads=N`` blocks only its own thread."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import replace

import pytest

from tests.conftest import Recorder, statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.test_dashboard import screen
from tests.test_sink_webhook import Receiver, webhook_receiver  # noqa: F401 (a fixture)
from worker import Handlers, Intent, PermanentError
from worker.dashboard.summary import summary_line
from worker.observe.findings import BAD, LOOP_STALL_SHOWN, WARN, Finding, assess
from worker.observe.loopwatch import LoopStall
from worker.observe.stats import Stats
from worker.producer import enqueue
from worker.store.sqlfiles import Names
from worker.units import fmt_duration

BLOCK_SECONDS = 4.0  # several times the threshold below: a stall that cannot go unseen
THRESHOLD = 1.0


def _loopwatch_messages(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "outbox.loopwatch"]


async def _enqueue(db, names: Names, kind: str, n: int, payload: dict | None = None) -> list[int]:
    return [await enqueue(db, kind, payload or {}, schema=names.schema) for _ in range(n)]


async def test_a_blocking_handler_is_named_and_the_others_are_delivered(
    db, names: Names, start_relay, caplog
) -> None:
    caplog.set_level(logging.INFO)
    noop = Recorder()

    async def block(intent: Intent) -> None:
        time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251 (the classic mistake)

    async with start_relay(
        {"noop": noop, "block": block}, loop_block_warning=THRESHOLD, concurrency=4
    ) as relay:
        before = await _enqueue(db, names, "noop", 10)
        (blocker,) = await _enqueue(db, names, "block", 1)
        after = await _enqueue(db, names, "noop", 10)
        await wait_until(lambda: statuses_are(db, names, {"sent": 21}))
        await wait_until(lambda: relay.stats.loop_stall and relay.stats.loop_stall.ended)
        snap = relay.stats.snapshot()

    assert noop.calls == {i: 1 for i in before + after}  # nothing lost, nothing twice
    records = _loopwatch_messages(caplog)
    warning = next(r for r in records if "event loop blocked" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert f"by block #{blocker}, at {__file__}:" in warning.getMessage()
    assert "in block" in warning.getMessage()
    assert warning.stack_info is not None and "time.sleep(BLOCK_SECONDS)" in warning.stack_info
    turned = next(r for r in records if "turning again" in r.getMessage())
    assert (
        turned.levelno == logging.WARNING
        and f"blocked by block #{blocker}" in turned.msg % turned.args
    )
    seconds = float(re.search(r"after ([\d.]+) s", turned.getMessage()).group(1))  # type: ignore[union-attr]
    assert seconds >= BLOCK_SECONDS - 0.05  # rounded to a tenth; it lasted at least that long
    assert snap.loop_stalls >= 1 and snap.loop_blocked_seconds >= BLOCK_SECONDS
    assert snap.loop_stall is not None and snap.loop_stall.culprit == f"block #{blocker}"
    header = screen(snap, 80, 24).splitlines()[0]  # the dashboard's verdict
    assert f"loop blocked {fmt_duration(snap.loop_stall.seconds)} by block #{blocker}" in header
    assert f"attention: loop blocked {fmt_duration(snap.loop_stall.seconds)}" in summary_line(snap)


def test_the_verdict_shows_a_stall_red_then_yellow_then_no_more() -> None:
    now = [1000.0]
    stats = Stats(4, clock=lambda: now[0])
    stall = LoopStall(since=1000.0, culprit="order_created #123", where="app.py:7 in send")
    stats.on_loop_stalled(stall)
    now[0] += 20.1
    ongoing = stats.snapshot().loop_stall
    assert ongoing is not None and ongoing.ago is None and ongoing.seconds == pytest.approx(20.1)
    stats.on_loop_turned(replace(stall, ended=now[0]))
    ended = now[0]
    red, yellow = LOOP_STALL_SHOWN
    for later, level in ((0.0, BAD), (red + 1, WARN), (yellow + 1, None)):
        now[0] = ended + later
        found = [f for f in assess(stats.snapshot()) if f.text.startswith("loop blocked")]
        expected = [Finding(level, "loop blocked 20s by order_created #123")] if level else []
        assert found == expected, later
    assert stats.snapshot().loop_stalls == 1
    assert stats.snapshot().loop_blocked_seconds == pytest.approx(20.1)


async def test_a_plain_handler_in_threads_leaves_the_loop_turning(
    db, names: Names, start_relay, caplog
) -> None:
    """The plain handler holds its thread until the test lets it go, which the test does
    only once the other intents are sent (the loop turned) and it has held it for several
    thresholds; on the loop it would deadlock instead."""
    caplog.set_level(logging.INFO)
    release = threading.Event()
    started: list[float] = []
    handlers = Handlers()
    noop = Recorder()

    @handlers.register("pdf", threads=2)
    def render_pdf(intent: Intent) -> None:
        started.append(time.monotonic())
        if not release.wait(timeout=60):
            raise RuntimeError("never released")
        if intent.payload.get("bad"):
            raise PermanentError("no such template")

    async with start_relay(
        {**handlers, "noop": noop}, loop_block_warning=THRESHOLD, concurrency=4
    ) as relay:
        pdf, bad = (
            await _enqueue(db, names, "pdf", 1),
            await _enqueue(db, names, "pdf", 1, {"bad": True}),
        )
        others = await _enqueue(db, names, "noop", 20)
        await wait_until(lambda: len(started) == 2 and len(noop.calls) == 20)
        await wait_until(lambda: time.monotonic() - max(started) > 3 * THRESHOLD)
        release.set()
        await wait_until(lambda: statuses_are(db, names, {"sent": 21, "dead": 1}))
        assert relay.stats.loop_stalls == 0

    assert noop.calls == {i: 1 for i in others}
    assert not _loopwatch_messages(caplog)
    reason = await db.fetchval(
        f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', *bad
    )
    assert reason == "no such template" and pdf[0] < bad[0]


async def test_a_threaded_handler_past_its_timeout_runs_on_and_holds_its_thread(
    db, names: Names, start_relay
) -> None:
    """A thread cannot be stopped: the attempt that overran its --delivery-timeout is retried
    while the thread runs on, and with threads=1 the retry waits for that thread (timing
    out too) instead of starting a second one."""
    release = threading.Event()
    running: list[int] = []
    ran: list[int] = []
    overlap: list[int] = []
    handlers = Handlers()

    @handlers.register("slow", threads=1)
    def slow(intent: Intent) -> None:
        running.append(intent.attempts)
        ran.append(intent.attempts)
        overlap.append(len(running))
        try:
            release.wait(timeout=60)
        finally:
            running.pop()

    async with start_relay(handlers, delivery_timeout=0.3, backoff_max=0.05):
        (intent_id,) = await _enqueue(db, names, "slow", 1)
        query = f'SELECT attempts FROM "{names.schema}".intent WHERE id = $1'
        await wait_until(lambda: _at_least(db.fetchval(query, intent_id), 3))
        release.set()
        await wait_until(lambda: statuses_are(db, names, {"sent": 1}))

    assert max(overlap) == 1  # never two calls at once
    # Attempt 2 timed out waiting for the thread, so it never ran; a later one did.
    assert ran[0] == 1 and 2 not in ran and len(ran) == 2
    row = await db.fetchrow(
        f'SELECT attempts, last_error FROM "{names.schema}".intent WHERE id = $1', intent_id
    )
    assert row["attempts"] == ran[1] and "timed out after 0.3s" in row["last_error"]


async def _at_least(value, n: int) -> bool:
    return (await value) >= n


def test_a_plain_function_needs_threads_and_an_async_one_refuses_them() -> None:
    handlers = Handlers()
    with pytest.raises(TypeError, match="'sms' is a plain function, which would block"):
        handlers.register("sms")(lambda intent: None)

    async def sms(intent: Intent) -> None:
        pass

    with pytest.raises(TypeError, match="is async: threads= is for plain functions"):
        handlers.register("sms", threads=2)(sms)
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        handlers.register("sms", threads=0)(lambda intent: None)


async def test_docs_blocking_code_snippet_keeps_the_loop_turning(
    db,
    names: Names,
    start_relay,
    receiver: Receiver,
) -> None:
    """The two ways out of docs/kinds/handlers.md, as written: the threaded handler's blocking
    HTTP call reaches a server on this very event loop, so it is answered only if the loop turns."""
    stored: dict[str, bytes] = {}

    class Storage:
        async def put(self, key: str, data: bytes) -> None:
            stored[key] = data

    def render_pdf(payload: dict) -> bytes:
        time.sleep(1.5 * THRESHOLD)  # blocking, and longer than the threshold
        return b"%PDF-1.7 order " + str(payload["order_id"]).encode()

    namespace = {"render_pdf": render_pdf, "storage": Storage(), "CRM_URL": f"{receiver.url}/c"}
    exec(
        doc_snippet("kinds/handlers.md", "Blocking code in handlers", "python").compile(), namespace
    )
    async with start_relay(namespace["handlers"], loop_block_warning=THRESHOLD) as relay:
        (pdf,) = await _enqueue(db, names, "invoice_pdf", 1, {"order_id": 7})
        (crm,) = await _enqueue(db, names, "crm_contact", 1, {"email": "a@example.com"})
        await wait_until(lambda: statuses_are(db, names, {"sent": 2}))
        assert relay.stats.loop_stalls == 0

    assert stored == {f"invoices/{pdf}.pdf": b"%PDF-1.7 order 7"}
    (request,) = receiver.requests
    assert (request.method, request.path) == ("POST", "/c")
    assert request.headers["Idempotency-Key"] == str(crm)
    assert json.loads(request.body) == {"email": "a@example.com"}
