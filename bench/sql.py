"""The bench's own named queries (bench/queries.sql), rendered for one run's names."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from worker.store.sqlfiles import Names

_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
OURS = Path(__file__).parent / "queries.sql"


@cache
def _blocks(path: Path) -> dict[str, str]:
    text = path.read_text()
    marks = list(_NAME_RE.finditer(text))
    return {
        mark.group(1): text[mark.end() : nxt.start() if nxt else len(text)].strip()
        for mark, nxt in zip(marks, [*marks[1:], None], strict=True)
    }


def query(name: str, names: Names | None = None, *, path: Path = OURS) -> str:
    """Query ``name``; ``path`` is another checkout's queries.sql (the baseline's)."""
    sql = _blocks(path)[name]
    return names.render(sql) if names is not None else sql
