"""ConnectGate on its own: one task connects, the tasks that waited share its failure."""

from __future__ import annotations

import logging

import anyio
from anyio import wait_all_tasks_blocked
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from worker.errors import TransientError
from worker.sinks.reconnect import ConnectGate


class Connector:
    """Counts its calls; each call waits for ``go``, then raises ``error`` or returns."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error
        self.go = anyio.Event()

    async def __call__(self) -> str:
        self.calls += 1
        await self.go.wait()
        if self.error is not None:
            raise self.error
        return f"connection {self.calls}"


async def _attempt(gate: ConnectGate, connect: Connector, results: list[object]) -> None:
    try:
        async with gate.turn() as turn:
            results.append(await turn.connect(connect))
    except Exception as exc:
        results.append(exc)


async def _race(gate: ConnectGate, connect: Connector, tasks: int) -> list[object]:
    """``tasks`` attempts at once; ``connect`` proceeds once all of them are blocked (one
    connecting, the others waiting for the lock). -> each attempt's result or error."""
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(_attempt, gate, connect, results)
        await wait_all_tasks_blocked()
        connect.go.set()
    return results


async def test_tasks_waiting_during_a_failed_connect_share_it_without_connecting() -> None:
    connect = Connector(TransientError("broker: cannot connect: refused"))
    results = await _race(ConnectGate(), connect, 5)
    assert connect.calls == 1
    assert len(results) == 5
    assert all(isinstance(r, TransientError) for r in results)
    assert {str(r) for r in results} == {"broker: cannot connect: refused"}


async def test_a_task_that_comes_after_the_backoff_connects_again() -> None:
    gate = ConnectGate(base=0.02, cap=0.02)
    connect = Connector(TransientError("down"))
    connect.go.set()
    results: list[object] = []
    await _attempt(gate, connect, results)
    await anyio.sleep(0.05)  # past the backoff (at most 0.02 s after the first failure)
    await _attempt(gate, connect, results)
    assert connect.calls == 2
    assert [str(r) for r in results] == ["down", "down"]


async def test_during_the_backoff_a_task_fails_at_once_without_connecting() -> None:
    gate = ConnectGate(base=60, cap=60)
    connect = Connector(TransientError("broker: cannot connect: refused"))
    connect.go.set()
    results: list[object] = []
    for _ in range(3):
        await _attempt(gate, connect, results)
    assert connect.calls == 1
    assert str(results[0]) == "broker: cannot connect: refused"
    assert all(isinstance(r, TransientError) for r in results)
    assert all(
        str(r).startswith("broker: cannot connect: refused (next connect in ") for r in results[1:]
    )


async def test_an_outage_is_logged_once_down_and_once_back(caplog) -> None:
    caplog.set_level(logging.INFO)
    gate = ConnectGate("broker b:1", base=0.01, cap=0.01)
    failing = Connector(TransientError("broker b:1: cannot connect: refused"))
    failing.go.set()
    results: list[object] = []
    for _ in range(5):
        await _attempt(gate, failing, results)
        await anyio.sleep(0.02)  # past each backoff: every attempt connects and fails
    working = Connector()
    working.go.set()
    await _attempt(gate, working, results)
    await _attempt(gate, working, results)
    assert failing.calls == 5 and working.calls == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("broker b:1 is down (cannot connect: refused); reconnecting")
    assert lines[1].startswith("broker b:1 is back after ") and "(5 failed connects)" in lines[1]


async def test_a_success_is_returned_and_not_shared() -> None:
    results = await _race(ConnectGate(), Connector(), 3)
    assert results == ["connection 1", "connection 2", "connection 3"]


async def test_only_transient_errors_are_shared() -> None:
    connect = Connector(ValueError("a bug, not a verdict on the broker"))
    results = await _race(ConnectGate(), connect, 3)
    assert connect.calls == 3
    assert all(isinstance(r, ValueError) for r in results)


async def test_the_lock_is_held_for_the_whole_turn() -> None:
    gate = ConnectGate()
    inside = 0
    most = 0

    async def hold(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal inside, most
        task_status.started()
        async with gate.turn():
            inside += 1
            most = max(most, inside)
            await checkpoint()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            await tg.start(hold)
    assert most == 1
    assert not gate.lock.locked()
