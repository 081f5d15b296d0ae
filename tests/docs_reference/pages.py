"""The reference pages by their path under docs/, each generated from the code."""

from __future__ import annotations

from tests.docs_reference.cli_page import cli_page
from tests.docs_reference.metrics_page import metrics_page
from tests.docs_reference.sql_page import REPO, sql_page

DOCS = REPO / "docs"


async def generate(dsn: str) -> dict[str, str]:
    """Every page's text; ``dsn``: a PostgreSQL the SQL page may make a scratch schema in."""
    return {
        "reference/cli.md": cli_page(),
        "reference/metrics.md": metrics_page(),
        "reference/sql.md": await sql_page(dsn),
    }
