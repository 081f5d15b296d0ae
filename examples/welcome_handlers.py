"""A runnable example of user handlers.

    outbox-worker migrate --dsn postgresql://postgres@127.0.0.1/test
    outbox-worker --dsn postgresql://postgres@127.0.0.1/test \
        --handlers examples.welcome_handlers:handlers
    outbox-worker enqueue --dsn postgresql://postgres@127.0.0.1/test \
        order_created '{"order_id": 42, "total_cents": 1999}'

(run from the repository root, or put the module anywhere on PYTHONPATH).
"""

from __future__ import annotations

import logging

from worker import Handlers, Intent, PermanentError, TransientError

log = logging.getLogger("example")
handlers = Handlers()


@handlers.register("order_created")
async def order_created(intent: Intent) -> None:
    order = intent.payload
    if not isinstance(order, dict) or "order_id" not in order:
        # Retrying cannot fix a malformed payload: mark it dead with the reason.
        raise PermanentError("payload needs an order_id")
    if order.get("total_cents", 0) < 0:
        raise PermanentError(f"order {order['order_id']}: negative total")
    if order.get("simulate_outage"):
        # Retried later with backoff (or after `retry_after` seconds, if given).
        raise TransientError("billing API unavailable", retry_after=5)
    # A real handler calls its API here, passing intent.id as the idempotency key so that
    # a redelivery (at-least-once) is recognised downstream.
    log.info("order %s published as intent %d", order["order_id"], intent.id)
