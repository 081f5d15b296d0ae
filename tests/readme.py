"""The README's fenced code blocks, found by section heading and first line, so that tests run
the README's own text: a snippet is never copied into a test, and so cannot drift from it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import CodeType

from markdown_it import MarkdownIt

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass(frozen=True)
class Snippet:
    text: str
    line: int  # the README line (1-based) of the snippet's first line, for tracebacks

    @property
    def first_line(self) -> str:
        return self.text.partition("\n")[0]

    def compile(self) -> CodeType:
        """Python code whose tracebacks name README.md and its lines; top-level ``await`` and
        ``async with`` allowed (``eval`` of such code returns a coroutine)."""
        padded = "\n" * (self.line - 1) + self.text
        return compile(padded, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@cache
def _sections() -> dict[str, list[tuple[str, Snippet]]]:
    """Heading text -> the (language, snippet) fences up to the next heading of any level."""
    sections: dict[str, list[tuple[str, Snippet]]] = {}
    current: list[tuple[str, Snippet]] = []
    tokens = MarkdownIt().parse(README.read_text())
    for token, following in zip(tokens, [*tokens[1:], None], strict=True):
        if token.type == "heading_open" and following is not None:
            current = sections.setdefault(following.content, [])
        elif token.type == "fence" and token.map is not None:
            current.append((token.info.strip(), Snippet(token.content, token.map[0] + 2)))
    return sections


def readme_snippets(heading: str, lang: str | None = None) -> list[Snippet]:
    """The ```lang blocks (all blocks if None) of the section titled ``heading``, as written
    after its #s ("Enqueueing from your stack", "The `email` kind")."""
    if heading not in _sections():
        raise LookupError(f"README.md has no section {heading!r}")
    return [s for info, s in _sections()[heading] if lang is None or info == lang]


def readme_snippet(heading: str, lang: str, first_line: str = "") -> Snippet:
    """The one ```lang block of section ``heading`` whose first line starts with
    ``first_line`` (a marker comment such as ``# Django``)."""
    found = [s for s in readme_snippets(heading, lang) if s.first_line.startswith(first_line)]
    if len(found) != 1:
        raise LookupError(
            f"README.md section {heading!r}: {len(found)} ```{lang} blocks start with"
            f" {first_line!r}, expected one"
        )
    return found[0]
