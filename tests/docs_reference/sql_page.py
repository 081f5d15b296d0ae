"""docs/reference/sql.md from the catalog of a freshly migrated schema: every table, view and
function `outbox-worker migrate` creates, their columns, constraints, indexes and triggers,
with the meanings their COMMENT ON statements keep in the database; then schema.sql whole."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import asyncpg

from tests.docs_reference.markdown import code, page, table
from worker.settings import default_channel
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names

REPO = Path(__file__).resolve().parents[2]
SHOWN = "outbox"  # the page shows the default schema name

_RELATIONS = """
SELECT c.oid, c.relname, c.relkind::text, c.relpersistence::text,
       obj_description(c.oid, 'pg_class') AS note
FROM pg_class c WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('r', 'v')
ORDER BY c.relkind, c.relname"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.attidentity::text,
       pg_get_expr(d.adbin, d.adrelid) AS default, col_description(a.attrelid, a.attnum) AS note
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"""
_CONSTRAINTS = """
SELECT conname, pg_get_constraintdef(oid) AS def,
       coalesce(obj_description(oid, 'pg_constraint'),
                CASE contype WHEN 'p' THEN 'Primary key.' END) AS note
FROM pg_constraint WHERE conrelid = $1 AND contype <> 't'  -- constraint triggers: below
ORDER BY contype <> 'p', conname"""
_INDEXES = """
SELECT c.relname, pg_get_indexdef(c.oid) AS def, obj_description(c.oid, 'pg_class') AS note
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = $1 AND NOT i.indisprimary ORDER BY c.relname"""
_TRIGGERS = """
SELECT tgname, pg_get_triggerdef(oid) AS def, obj_description(oid, 'pg_trigger') AS note
FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY tgname"""
_FUNCTIONS = """
SELECT p.proname, pg_get_function_arguments(p.oid) AS args,
       pg_get_function_result(p.oid) AS result, p.prosecdef,
       obj_description(p.oid, 'pg_proc') AS note
FROM pg_proc p WHERE p.pronamespace = $1::regnamespace AND p.prorettype <> 'trigger'::regtype
ORDER BY p.proname"""
_INDEX_DEF = re.compile(r"^CREATE (?P<unique>UNIQUE )?INDEX \S+ ON \S+ USING (?P<rest>.*)$")


class _Catalog:
    """Queries on one scratch schema; every mention of its name reads as ``outbox``."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    async def fetch(self, query: str, arg: object) -> list[dict[str, object]]:
        rows = await self.conn.fetch(query, arg)
        return [
            {k: v.replace(self.schema, SHOWN) if isinstance(v, str) else v for k, v in r.items()}
            for r in rows
        ]


def _note(value: object) -> str:
    return str(value) if value else ""


def _columns_table(columns: list[dict[str, object]], view: bool) -> str:
    if view:  # a view's columns have no default and no constraint
        rows = [(code(str(c["attname"])), code(str(c["type"])), _note(c["note"])) for c in columns]
        return table(("column", "type", "meaning"), rows)
    full = []
    for col in columns:
        kind = f"{col['type']}{' not null' if col['attnotnull'] else ''}"
        default = (
            "generated always as identity" if col["attidentity"] == "a" else _note(col["default"])
        )
        full.append(
            (code(str(col["attname"])), code(kind), code(default) if default else "",
             _note(col["note"]))
        )  # fmt: skip
    return table(("column", "type", "default", "meaning"), full)


async def _relation(cat: _Catalog, rel: dict[str, object]) -> str:
    oid, name = rel["oid"], str(rel["relname"])
    is_view = rel["relkind"] == "v"
    what = "View" if is_view else "Unlogged table" if rel["relpersistence"] == "u" else "Table"
    parts = [f"## {what} `{SHOWN}.{name}`", _note(rel["note"])]
    parts.append(_columns_table(await cat.fetch(_COLUMNS, oid), view=is_view))
    constraints = await cat.fetch(_CONSTRAINTS, oid)
    if constraints:
        rows = [
            (code(str(c["conname"])), code(str(c["def"])), _note(c["note"])) for c in constraints
        ]
        parts += ["### Constraints", table(("constraint", "definition", "meaning"), rows)]
    indexes = await cat.fetch(_INDEXES, oid)
    if indexes:
        rows = []
        for ix in indexes:
            found = _INDEX_DEF.match(str(ix["def"]))
            shown = f"{'unique ' if found['unique'] else ''}{found['rest']}" if found else ix["def"]
            rows.append((code(str(ix["relname"])), code(str(shown)), _note(ix["note"])))
        parts += [
            "### Indexes",
            "Besides the primary key.",
            table(("index", "on", "meaning"), rows),
        ]
    triggers = await cat.fetch(_TRIGGERS, oid)
    if triggers:
        rows = [(code(str(t["tgname"])), code(str(t["def"])), _note(t["note"])) for t in triggers]
        parts += ["### Triggers", table(("trigger", "definition", "meaning"), rows)]
    if is_view:
        view = await cat.conn.fetchval("SELECT pg_get_viewdef($1::oid, true)", oid)
        parts += ["### Definition", f"```sql\n{view.replace(cat.schema, SHOWN).strip()}\n```"]
    return "\n\n".join(p for p in parts if p)


def _function(fn: dict[str, object]) -> str:
    args = ",\n    ".join(re.split(r", (?=\w+ )", str(fn["args"])))
    rights = " SECURITY DEFINER" if fn["prosecdef"] else ""
    signature = f"{SHOWN}.{fn['proname']}(\n    {args}\n) RETURNS {fn['result']}{rights}"
    return "\n\n".join(
        p for p in (f"## Function `{SHOWN}.{fn['proname']}`", _note(fn["note"]),
                    f"```sql\n{signature}\n```") if p
    )  # fmt: skip


def readable_schema() -> str:
    """schema.sql and triggers/*.sql, rendered for the default names."""
    names = Names(SHOWN, default_channel(SHOWN))
    files = [REPO / "schema.sql", *sorted((REPO / "triggers").glob("*.sql"))]
    return "\n".join(f"-- {f.relative_to(REPO)}\n{names.render(f.read_text())}" for f in files)


async def sql_page(dsn: str) -> str:
    schema = f"docs_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, Names(schema, default_channel(schema)))
        cat = _Catalog(conn, schema)
        relations = await cat.fetch(_RELATIONS, f'"{schema}"')
        # The intent table first: it is the contract; then functions, views, the rest.
        first = [r for r in relations if r["relname"] == "intent"]
        views = [r for r in relations if r["relkind"] == "v"]
        rest = [r for r in relations if r not in first and r not in views]
        functions = [_function(f) for f in await cat.fetch(_FUNCTIONS, f'"{schema}"')]
        sections = [
            *[await _relation(cat, r) for r in first],
            *functions,
            *[await _relation(cat, r) for r in [*views, *rest]],
        ]
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return page(
        "SQL contract",
        "the catalog of a freshly migrated schema and schema.sql",
        f"What `outbox-worker migrate` creates, shown for the default schema `{SHOWN}` "
        "(`--schema` or `OUTBOX_SCHEMA` names another). The meanings are the database's own "
        f"comments: `\\d+ {SHOWN}.intent` in psql shows them too.",
        *sections,
        "## schema.sql",
        "The whole current schema as one script, with the triggers, rendered for the default "
        "names. `outbox-worker migrate` applies the numbered migrations that build exactly "
        "this; `outbox-worker schema` prints them for your own migration tool.",
        f"```sql\n{readable_schema().strip()}\n```",
    )
