"""The pages' code outside the producer snippets that runs against the worker's own code:
the webhook receiver's ``verify`` and the handlers example, read from the pages as written."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.conftest import statuses_are, wait_until
from tests.docs_text import REPO, doc_section, doc_snippet, doc_snippets
from worker import enqueue
from worker.sinks.webhook.sink import SIGNATURE_HEADER, sign
from worker.store.sqlfiles import Names

WEBHOOK = ("kinds/webhook.md", "Headers and the signature")
PLUGIN = REPO / "tests" / "plugin_sink"


def _run(section: tuple[str, str], **given: Any) -> dict[str, Any]:
    """Run the section's ```python block with ``given`` defined; return what it defined."""
    namespace = dict(given)
    exec(doc_snippet(*section, "python").compile(), namespace)
    return namespace


def test_docs_verify_accepts_what_the_worker_signs_and_nothing_else() -> None:
    verify: Callable[..., bool] = _run(WEBHOOK)["verify"]
    body = orjson.dumps({"order_id": 42})  # as the sink serialises a payload's body
    now = int(time.time())
    header = sign("s3cret", now, body)

    assert verify("s3cret", header, body)
    assert not verify("s3cret", header, body + b" ")
    assert not verify("another", header, body)
    assert not verify("s3cret", sign("s3cret", now - 301, body), body)  # a replay
    assert not verify("s3cret", "v1=abc", body)


def test_docs_signature_example_is_what_the_worker_sends() -> None:
    """The page's example header, for the secret, body and time its text names."""
    example = doc_snippet(*WEBHOOK, "", SIGNATURE_HEADER).text.strip()
    body = orjson.dumps({"order_id": 42})
    assert example == f"{SIGNATURE_HEADER}: {sign('s3cret', 1718000000, body)}"
    verify = _run(WEBHOOK)["verify"]
    value = example.removeprefix(f"{SIGNATURE_HEADER}: ")
    assert verify("s3cret", value, body, tolerance=time.time())  # old, but genuine


class Billing:
    """The application's own API that the page's handler calls: keeps what it was given."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, str]] = []

    async def publish(self, payload: Any, *, idempotency_key: str) -> None:
        self.published.append((payload, idempotency_key))


async def test_docs_handler_publishes_an_order_and_kills_a_payload_without_one(
    db, names: Names, start_relay
) -> None:
    billing = Billing()
    handlers = _run(("kinds/handlers.md", "Your own handlers"), billing=billing)["handlers"]
    order = {"order_id": 42, "total_cents": 1999}
    async with start_relay(handlers):
        good = await enqueue(db, "order_created", order, schema=names.schema)
        bad = await enqueue(db, "order_created", {"total_cents": 5}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 1, "dead": 1}))

    assert billing.published == [(order, str(good))]
    reason = await db.fetchval(f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', bad)
    assert "payload needs an order_id" in reason


@pytest.mark.parametrize(
    ("heading", "lang", "path"),
    [
        ("The sink", "python", "outbox_file_sink/sink.py"),
        ("The spec", "python", "outbox_file_sink/__init__.py"),
        ("The entry point", "toml", "pyproject.toml"),
    ],
)
def test_the_sink_writing_page_shows_the_tested_plugin_as_it_is(
    heading: str, lang: str, path: str
) -> None:
    """docs/kinds/writing-a-sink.md shows tests/plugin_sink's files, which
    tests/test_sink_plugin.py installs and runs: the page cannot drift from working code."""
    [snippet] = doc_snippets("kinds/writing-a-sink.md", heading, lang)
    assert snippet.text == (PLUGIN / path).read_text()


def test_the_upgrades_page_lists_every_migration() -> None:
    """A new migration without its row in docs/operating/upgrades.md fails here."""
    shipped = sorted(p.stem for p in (REPO / "worker" / "store" / "migrations").glob("*.sql"))
    table = doc_section("operating/upgrades.md", "The migrations")
    assert re.findall(r"^\| `(\d{4}_\w+)` \|", table, re.MULTILINE) == shipped


def test_how_it_works_draws_the_relay_as_its_package_docstring_does() -> None:
    import worker.relay

    [drawn] = doc_snippets("concepts/how-it-works.md", "The data flow", "text")
    diagram = textwrap.dedent((worker.relay.__doc__ or "").split("\n\n")[1])
    assert drawn.text == diagram.rstrip("\n") + "\n"
