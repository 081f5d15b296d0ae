"""Loads the project's SQL: the schema, the triggers and the named runtime queries.

Every file may use these placeholders, filled in once at start-up:
  {{schema}}  -> the schema name quoted as an identifier (``"outbox"``)
  {{channel}} -> the NOTIFY channel as a string literal (``'outbox_intent'``)
  {{blocks_key}}, {{blocks_key(b)}} -> the one definition of "this row holds up its
                 ordering key" (pending, in flight, or dead and not skipped), on the row in
                 scope or on alias ``b``; the partial index intent_ordering_blocking has it
                 as its predicate, so every query that probes that index must say it alike
  {{idle_flag_lock}} -> the advisory-lock key that orders a worker declaring itself idle
                 against producers deciding not to notify (triggers/010_notify_on_commit.sql)
  {{retention_lock}} -> the advisory-lock key of the one deleter at a time (retention, purge)
                 on this schema's table
Values never go through here: they are always bind parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_NAME_RE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_BLOCKS_KEY_RE = re.compile(r"\{\{blocks_key(?:\((\w+)\))?\}\}")
_BLOCKS_KEY = (
    "({p}status IN ('pending', 'processing') OR ({p}status = 'dead' AND NOT {p}ordering_skipped))"
)
IDLE_FLAG_LOCK_CLASS = 5236  # the first half of the key; the second is hashtext(channel)
_IDLE_FLAG_LOCK = f"{IDLE_FLAG_LOCK_CLASS}, hashtext({{{{channel}}}})"
RETENTION_LOCK_CLASS = 5237  # the second half is hashtext(schema name)


def quote_ident(name: str) -> str:
    """PostgreSQL identifier quoting (``quote_ident`` semantics, always quoted)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _migration_root() -> Path:
    """schema.sql and triggers/: inside the wheel, or at the top of a source checkout."""
    packaged = Path(str(resources.files("worker") / "_sql"))
    if (packaged / "schema.sql").is_file():
        return packaged
    return _PACKAGE_DIR.parent.parent


@dataclass(frozen=True, slots=True)
class Names:
    """The configured names, already quoted for splicing into SQL text."""

    schema: str
    channel: str

    def render(self, sql: str) -> str:
        sql = _BLOCKS_KEY_RE.sub(lambda m: _BLOCKS_KEY.format(p=f"{m[1]}." if m[1] else ""), sql)
        sql = sql.replace("{{idle_flag_lock}}", _IDLE_FLAG_LOCK)
        sql = sql.replace(
            "{{retention_lock}}",
            f"{RETENTION_LOCK_CLASS}, hashtext({quote_literal(self.schema)})",
        )
        return sql.replace("{{schema}}", quote_ident(self.schema)).replace(
            "{{channel}}", quote_literal(self.channel)
        )


def migration_files() -> list[Path]:
    """schema.sql first, then triggers/*.sql in name order."""
    root = _migration_root()
    return [root / "schema.sql", *sorted((root / "triggers").glob("*.sql"))]


def migration_sql(names: Names) -> str:
    parts = [f"-- {path.name}\n{names.render(path.read_text())}" for path in migration_files()]
    return "\n".join(parts)


def load_queries(names: Names) -> dict[str, str]:
    """Every ``-- name: foo`` block of worker/store/sql/*.sql, rendered for these names."""
    queries: dict[str, str] = {}
    for path in sorted((_PACKAGE_DIR / "sql").glob("*.sql")):
        text = path.read_text()
        marks = list(_NAME_RE.finditer(text))
        for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
            body = text[mark.end() : nxt.start() if nxt else len(text)].strip()
            if mark.group(1) in queries:
                raise RuntimeError(f"query {mark.group(1)!r} defined twice ({path.name})")
            queries[mark.group(1)] = names.render(body)
    return queries
