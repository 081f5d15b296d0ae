"""Loading user handlers, and the documented example working end to end."""

from __future__ import annotations

import pytest

from tests.conftest import wait_until
from worker.errors import ConfigError
from worker.producer import enqueue
from worker.sinks.handlers import load_handlers
from worker.store.sqlfiles import Names


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "expected MODULE:ATTRIBUTE"),
        ("no_such_module_xyz:handlers", "cannot import 'no_such_module_xyz'"),
        ("tests.sample_handlers:missing", "has no attribute 'missing'"),
        ("tests.sample_handlers:anyio", "expected a mapping of kind -> async callable"),
        ("tests.test_handlers:SYNC_HANDLERS", "the handler for 'sync' is a plain function"),
        ("tests.test_handlers:NOT_CALLABLE", "the handler for 'x' is not an async callable"),
    ],
)
def test_bad_handler_specs_are_clear_errors(spec: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_handlers(spec)


SYNC_HANDLERS = {"sync": lambda intent: None}
NOT_CALLABLE = {"x": 42}


class _Callable:
    async def __call__(self, intent: object) -> None:
        pass


def test_plain_dict_and_async_callable_objects_are_accepted():
    import tests.test_handlers as me

    me.OBJ_HANDLERS = {"obj": _Callable()}  # type: ignore[attr-defined]
    assert list(load_handlers("tests.test_handlers:OBJ_HANDLERS")) == ["obj"]


async def test_docs_example_handlers_deliver_and_reject(db, names: Names, start_relay):
    from examples.welcome_handlers import handlers

    async with start_relay(dict(handlers)):
        async with db.transaction():
            good = await enqueue(db, "order_created", {"order_id": 1}, schema=names.schema)
            bad = await enqueue(db, "order_created", {"total_cents": 5}, schema=names.schema)
        await wait_until(lambda: _has_statuses(db, names, ["sent", "dead"]))
    reason = await db.fetchval(f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', bad)
    assert reason == "payload needs an order_id" and good < bad


async def _has_statuses(db, names: Names, expected: list[str]) -> bool:
    rows = await db.fetch(f'SELECT status FROM "{names.schema}".intent ORDER BY id')
    return [r["status"] for r in rows] == expected
