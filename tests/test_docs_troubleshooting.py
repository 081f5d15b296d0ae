"""docs/operating/troubleshooting.md quotes the worker's own words; they must still be the code's.

The page's convention, which its introduction tells readers too:

- Every line of a fenced block marked ```text is one thing the worker itself prints: a log
  line without its time, level and logger, a dashboard badge or line, a line of
  ``outbox-worker status``, a ``/readyz`` answer, a metric line. Output of other programs
  (PostgreSQL, psql, PgBouncer) goes in other blocks (```console, ```sql, ```sh): those are
  not checked.
- The parts that vary are placeholders: a word in capitals (``N``, ``KIND``, ``ID``,
  ``KEY``, ``ROLE``, ``FLAG``...), a number (``14s``, ``2,000,030``), or ``...``.

The check: each quoted line is split at its placeholders; every fixed fragment left (trimmed of
spaces and punctuation at its ends) of at least ``MIN_FRAGMENT`` characters must be text the
code can produce. That is, a substring of a string literal in ``worker/**/*.py`` (implicitly
concatenated literals count as one; docstrings do not count) or ``worker/**/*.sql``; or text
that one such literal renders when its fields (an f-string's ``{...}``, ``%s``-style and
``str.format`` fields, or what is written around the literal) are filled in, provided the
literal's own characters make at least half of the fragment. So a reworded message fails
this test until the page follows, while a quoted line may still show a field's usual value
(``--worker-role``, ``claim loop``).

Its links and anchors are checked with every other page's by the strict build
(tests/test_docs_site.py).
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Iterator
from functools import cache

import pytest

from tests.docs_text import REPO, doc_fences, page_path

PAGE = "operating/troubleshooting.md"
MIN_FRAGMENT = 6  # shorter fixed text ("dead", "role") says nothing about the message
MIN_LITERAL_SHARE = 0.5  # of a fragment, when a literal's fields fill in the rest
PLACEHOLDER = re.compile(r"\.\.\.|…|\b[A-Z][A-Z0-9_]*\b|\d+(?:[.,]\d+)*")
_EDGES = string.whitespace + string.punctuation
# Fields inside a plain literal: %-style (logging) and str.format ones.
_FIELD = re.compile(r"%(?:\(\w+\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[sdifgrxe]|\{[^{}]*\}")
_SQL_LITERAL = re.compile(r"'((?:[^']|'')*)'")


# --- the page ---------------------------------------------------------------------------------


def quoted_lines() -> list[str]:
    """Every line of the page's ```text blocks."""
    return [
        line.strip()
        for _, snippet in doc_fences(PAGE, "text")
        for line in snippet.text.splitlines()
        if line.strip()
    ]


def fragments(line: str) -> list[str]:
    """The fixed text of a quoted line: what is left between its placeholders, trimmed."""
    parts = (part.strip(_EDGES) for part in PLACEHOLDER.split(line))
    return [part for part in parts if len(part) >= MIN_FRAGMENT]


# --- the code ---------------------------------------------------------------------------------


def _split_fields(pieces: list[str]) -> tuple[str, ...]:
    return tuple(part for piece in pieces for part in _FIELD.split(piece))


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """The module's ``NAME = "text"`` constants, which its f-strings may name."""
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        if isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def _python_templates(tree: ast.Module) -> Iterator[tuple[str, ...]]:
    """Every string literal as its literal pieces (a field lies between two pieces)."""
    named = _module_strings(tree)
    skip: set[int] = set()  # docstrings, bare strings, and the constant parts of f-strings
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            pieces = [""]
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    pieces[-1] += value.value
                elif (text := _named_constant(value, named)) is not None:
                    pieces[-1] += text  # {_FLAG}: a module constant is its text, not a field
                else:
                    pieces.append("")
            yield _split_fields(pieces)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield _split_fields([node.value])


def _named_constant(value: ast.expr, named: dict[str, str]) -> str | None:
    """The text of ``{NAME}`` in an f-string when NAME is a module's string constant."""
    if not (isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name)):
        return None
    plain = value.conversion == -1 and value.format_spec is None
    return named.get(value.value.id) if plain else None


def _sql_templates(text: str) -> Iterator[tuple[str, ...]]:
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())  # no comments
    for literal in _SQL_LITERAL.findall(code):
        yield (literal.replace("''", "'"),)


@cache
def templates() -> tuple[tuple[str, ...], ...]:
    found: set[tuple[str, ...]] = set()
    for path in sorted((REPO / "worker").rglob("*.py")):
        found.update(_python_templates(ast.parse(path.read_text(), str(path))))
    for path in sorted((REPO / "worker").rglob("*.sql")):
        found.update(_sql_templates(path.read_text()))
    return tuple(t for t in found if any(t))


@cache
def _all_pieces() -> str:
    return "\x00".join(piece for template in templates() for piece in template)


def literal_share(fragment: str, pieces: tuple[str, ...]) -> int:
    """The most characters of ``fragment`` that ``pieces`` can supply in one rendering of
    the template (field, piece, field, piece, ..., field), the fields filling in the rest."""
    if any(fragment in piece for piece in pieces):
        return len(fragment)
    end = len(fragment)

    @cache
    def after_field(pos: int, j: int) -> int:  # fragment[pos:] = a field, then pieces[j:]
        if pos == end or j == len(pieces):
            return 0
        piece, best = pieces[j], 0
        if not piece:
            return after_field(pos, j + 1)
        for start in range(pos, end):
            tail = fragment[start:]
            if tail.startswith(piece):
                best = max(best, len(piece) + after_field(start + len(piece), j + 1))
            elif piece.startswith(tail):
                best = max(best, len(tail))
        return best

    # The fragment starts in the field before some piece, or inside a piece.
    best = max(after_field(0, i) for i in range(len(pieces)))
    for i, piece in enumerate(pieces):
        for k in range(1, min(len(piece), end) + 1):
            if piece.endswith(fragment[:k]):
                best = max(best, k + after_field(k, i + 1))
    return best


def in_code(fragment: str) -> bool:
    if fragment in _all_pieces():
        return True
    needed = MIN_LITERAL_SHARE * len(fragment)
    return any(literal_share(fragment, t) >= needed for t in templates())


# --- the tests --------------------------------------------------------------------------------


def test_the_page_quotes_messages_in_the_checked_form() -> None:
    lines = quoted_lines()
    assert len(lines) >= 40, "the ```text blocks hold the quoted messages"
    assert sum(len(fragments(line)) for line in lines) >= 60


@pytest.mark.parametrize("line", quoted_lines())
def test_every_quoted_message_is_one_the_code_can_print(line: str) -> None:
    missing = [f for f in fragments(line) if not in_code(f)]
    assert not missing, f"not in worker/: {missing} (from {line!r})"


def test_a_reworded_message_is_caught() -> None:
    """The check itself: a real message passes, the same message reworded does not."""
    real = "claims resumed after 12.3s: outcomes are recorded again (0 still waiting, 3 rows held)"
    reworded = real.replace("recorded again", "written again")
    assert all(in_code(f) for f in fragments(real))
    assert not all(in_code(f) for f in fragments(reworded))


def test_the_symptom_table_links_to_its_sections() -> None:
    assert re.search(r"\]\(#[a-z0-9-]+\)", page_path(PAGE).read_text())
