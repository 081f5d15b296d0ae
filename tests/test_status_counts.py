"""`outbox-worker status` on a big table: sent intents estimated (labelled so), everything
else counted exactly over its partial index."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from worker.cli import admin


async def _fill(db, schema: str) -> None:
    await db.execute(
        f"""INSERT INTO "{schema}".intent (kind, payload, status, sent_at, last_error,
                                          locked_by, locked_until)
        SELECT 'email', '{{}}', s, CASE WHEN s = 'sent' THEN now() END,
               CASE WHEN s = 'dead' THEN 'refused' END,
               CASE WHEN s = 'processing' THEN 'w' END,
               CASE WHEN s = 'processing' THEN now() + interval '1 hour' END
        FROM unnest(array_fill('sent'::text, ARRAY[100])
                    || ARRAY['pending', 'pending', 'pending', 'processing', 'dead']) AS s"""
    )
    await db.execute(f"INSERT INTO \"{schema}\".intent (kind, payload) VALUES ('webhook', '{{}}')")
    await db.execute(f'ANALYZE "{schema}".intent')


async def test_a_big_table_gets_exact_live_counts_and_a_labelled_sent_estimate(
    db, names, monkeypatch: pytest.MonkeyPatch
):
    await _fill(db, names.schema)
    exact = await admin.status(db, names)
    assert exact["sent_estimate"] is None
    assert exact["by_kind"]["email"] == {"sent": 100, "pending": 3, "processing": 1, "dead": 1}

    monkeypatch.setattr(admin, "EXACT_BELOW", 50)  # this table is "big" now
    report = await admin.status(db, names)
    assert report["by_kind"] == {
        "email": {"pending": 3, "processing": 1, "dead": 1},
        "webhook": {"pending": 1},
    }
    assert report["sent_estimate"] == 100  # ANALYZE of a small table counts every row
    assert report["dead"] == 1
    out = io.StringIO()
    admin.print_status(report, Console(file=out, width=200))
    assert "sent: not counted on a table this big; about 100 in all (an estimate" in out.getvalue()
