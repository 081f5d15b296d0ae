"""The documentation's fenced code blocks and sections, found by page and heading, so that
tests run the pages' own text: a snippet is never copied into a test, and so cannot drift
from what a reader sees. A page is a path under docs/ ("producers.md", "kinds/sidekiq.md")
or "README.md"."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import CodeType

from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def page_path(page: str) -> Path:
    return REPO / page if page == "README.md" else DOCS / page


@dataclass(frozen=True)
class Snippet:
    text: str
    path: Path
    line: int  # the page's line (1-based) of the snippet's first line, for tracebacks

    @property
    def first_line(self) -> str:
        return self.text.partition("\n")[0]

    def compile(self) -> CodeType:
        """Python code whose tracebacks name the page and its lines; top-level ``await`` and
        ``async with`` allowed (``eval`` of such code returns a coroutine)."""
        padded = "\n" * (self.line - 1) + self.text
        return compile(padded, str(self.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@dataclass(frozen=True)
class _Section:
    level: int
    start: int  # 0-based line of the heading
    fences: list[tuple[str, Snippet]]


@cache
def _sections(page: str) -> dict[str, _Section]:
    """Heading text -> its level, line and the (language, snippet) fences up to the next
    heading of any level."""
    path = page_path(page)
    sections: dict[str, _Section] = {}
    current: list[tuple[str, Snippet]] = []
    tokens = MarkdownIt().enable("table").parse(path.read_text())
    for token, following in zip(tokens, [*tokens[1:], None], strict=True):
        if token.type == "heading_open" and following is not None and token.map is not None:
            if following.content in sections:
                raise LookupError(f"{page}: two sections titled {following.content!r}")
            current = []
            sections[following.content] = _Section(int(token.tag[1:]), token.map[0], current)
        elif token.type == "fence" and token.map is not None:
            current.append((token.info.strip(), Snippet(token.content, path, token.map[0] + 2)))
    return sections


def _section(page: str, heading: str) -> _Section:
    found = _sections(page).get(heading)
    if found is None:
        raise LookupError(f"{page} has no section {heading!r}")
    return found


def doc_snippets(page: str, heading: str, lang: str | None = None) -> list[Snippet]:
    """The ```lang blocks (all blocks if None) of the section titled ``heading`` (as written
    after its #s: "Enqueueing from your stack", "The `email` kind"), up to the next heading."""
    return [s for info, s in _section(page, heading).fences if lang is None or info == lang]


def doc_snippet(page: str, heading: str, lang: str, first_line: str = "") -> Snippet:
    """The one ```lang block of section ``heading`` whose first line starts with
    ``first_line`` (a marker comment such as ``# Django``)."""
    found = [s for s in doc_snippets(page, heading, lang) if s.first_line.startswith(first_line)]
    if len(found) != 1:
        raise LookupError(
            f"{page} section {heading!r}: {len(found)} ```{lang} blocks start with"
            f" {first_line!r}, expected one"
        )
    return found[0]


def doc_fences(page: str, lang: str) -> list[tuple[str, Snippet]]:
    """Every ```lang block of the page, with the heading of its section."""
    return [
        (heading, snippet)
        for heading, section in _sections(page).items()
        for info, snippet in section.fences
        if info == lang
    ]


def doc_section(page: str, heading: str) -> str:
    """The text of section ``heading``, its subsections included (up to the next heading of
    its level or higher)."""
    section = _section(page, heading)
    lines = page_path(page).read_text().splitlines(keepends=True)
    ends = [
        s.start
        for s in _sections(page).values()
        if s.start > section.start and s.level <= section.level
    ]
    return "".join(lines[section.start : min(ends, default=len(lines))])
