"""Loads the project's SQL: the numbered migrations and the named runtime queries.

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


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file's name after the number: "initial"
    sql: str  # as written, placeholders and all

    def record(self, names: Names) -> str:
        return names.render(
            "INSERT INTO {{schema}}.schema_version (version, name) "
            f"VALUES ({self.version}, {quote_literal(self.name)}) ON CONFLICT DO NOTHING;"
        )


# Where `migrate` records what it applied; created before any migration runs.
VERSION_TABLE = """CREATE SCHEMA IF NOT EXISTS {{schema}};
CREATE TABLE IF NOT EXISTS {{schema}}.schema_version (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);"""
_MIGRATION_RE = re.compile(r"^(\d{4})_(\w+)\.sql$")


def migrations() -> list[Migration]:
    """worker/store/migrations/NNNN_name.sql in order, numbered 1, 2, 3... without a gap."""
    found = []
    for path in sorted((_PACKAGE_DIR / "migrations").glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if match is None:
            raise RuntimeError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("migrations must be numbered 0001, 0002, ... without a gap")
    return found


def migration_sql(names: Names, pending: list[Migration] | None = None) -> str:
    """The SQL that brings a schema up to date (every migration, or ``pending``), each
    followed by its record in schema_version: what `outbox-worker schema` prints."""
    parts = [names.render(VERSION_TABLE)]
    for m in migrations() if pending is None else pending:
        parts.append(
            f"-- migration {m.version:04d}_{m.name}\n{names.render(m.sql)}\n{m.record(names)}"
        )
    return "\n\n".join(parts)


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
