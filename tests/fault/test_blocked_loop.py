"""A handler that blocks the event loop, in real worker processes (uvloop, JSON logs).

Invariant: the worker says so, naming the intent whose handler holds the loop and the line
it blocks in, and again with the stall's length once the loop turns; every other intent is
still delivered exactly once (the lease outlasts the block, so nothing is rescued), and a
plain handler registered with ``threads=N`` blocks only its thread: no warning at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio

from tests.conftest import wait_until
from tests.fault.ledger import Outbox
from tests.fault.workers import LogLine, WorkerProcess

SAMPLE_HANDLERS = Path(__file__).resolve().parents[1] / "sample_handlers.py"
BLOCK_SECONDS = 5.0  # five times the threshold: no load on the machine hides it
WATCH = ["--loop-block-warning", "1"]


def _loopwatch(worker: WorkerProcess) -> list[LogLine]:
    return [ln for ln in worker.lines if ln.record and ln.record["logger"] == "outbox.loopwatch"]


async def _noops(outbox: Outbox, n: int) -> None:
    await outbox.conn.execute(
        f"INSERT INTO {outbox.table} (kind, payload) SELECT 'noop', '{{}}' "
        "FROM generate_series(1, $1)",
        n,
    )


async def _all_sent_once(outbox: Outbox, n: int) -> None:
    await outbox.wait_settled(timeout=60)
    rows = await outbox.rows()
    assert len(rows) == n
    assert {(r["status"], r["attempts"]) for r in rows.values()} == {("sent", 1)}


async def test_a_blocking_handler_is_named_and_nothing_is_lost(outbox, spawn) -> None:
    workers = [await spawn(concurrency=4, lease=30.0, extra=WATCH) for _ in range(2)]
    for worker in workers:
        await worker.ready()
    await _noops(outbox, 100)
    blocker = await outbox.enqueue("block", f'{{"seconds": {BLOCK_SECONDS}}}')
    await _noops(outbox, 100)
    await _all_sent_once(outbox, 201)

    def turned() -> bool:  # the recovery line follows the block's end
        return any("turning again" in ln.msg for w in workers for ln in _loopwatch(w))

    await wait_until(turned, timeout=30)
    (blocked,) = [w for w in workers if _loopwatch(w)]  # only the one that took it
    warning, recovered = _loopwatch(blocked)
    assert warning.level == "warning" and recovered.level == "warning"
    assert f"by block #{blocker}, at {SAMPLE_HANDLERS}:" in warning.msg
    assert "in block: other deliveries, lease heartbeats and the LISTEN ping" in warning.msg
    assert "time.sleep(float(intent.payload" in warning.record["stack"]
    match = re.search(rf"after ([\d.]+) s blocked by block #{blocker}, at ", recovered.msg)
    assert match and float(match.group(1)) >= BLOCK_SECONDS - 0.05
    print(f"\n{warning.msg}\n{warning.record['stack']}\n{recovered.msg}")


async def test_a_plain_handler_in_threads_blocks_only_its_thread(outbox, spawn, tmp_path) -> None:
    """The threaded handler sleeps until a file exists, which the test creates only once
    every other intent is sent and the handler has slept through several thresholds."""
    worker = await spawn(concurrency=4, lease=30.0, extra=WATCH)
    await worker.ready()
    until = tmp_path / "go"
    sleepers = [await outbox.enqueue("sleepy", f'{{"until": "{until}"}}') for _ in range(2)]
    await _noops(outbox, 100)
    sent = f"SELECT count(*) FROM {outbox.table} WHERE kind = 'noop' AND status = 'sent'"
    busy = f"SELECT count(*) FROM {outbox.table} WHERE kind = 'sleepy' AND status = 'processing'"
    await wait_until(lambda: _equals(outbox.conn.fetchval(sent), 100), timeout=60)
    assert await outbox.conn.fetchval(busy) == len(sleepers)  # still sleeping in threads
    await anyio.sleep(3)  # three thresholds more of sleeping in them
    until.touch()
    await _all_sent_once(outbox, 102)
    assert not _loopwatch(worker), worker.tail()


async def _equals(value, expected: int) -> bool:
    return await value == expected
