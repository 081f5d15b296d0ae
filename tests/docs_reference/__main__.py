"""Writes the reference pages: ``python -m tests.docs_reference`` (the SQL page migrates a
scratch schema in DATABASE_URL, else the local PostgreSQL at 127.0.0.1:5432, and drops it)."""

from __future__ import annotations

import os

import anyio

from tests.docs_reference.pages import DOCS, generate

LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> None:
    pages = anyio.run(generate, os.environ.get("DATABASE_URL") or LOCAL)
    for name, text in pages.items():
        path = DOCS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        changed = not path.exists() or path.read_text() != text
        path.write_text(text)
        print(f"{path.relative_to(DOCS.parent)}: {'written' if changed else 'unchanged'}")


if __name__ == "__main__":
    main()
