"""A sink is named only by its own modules: the relay, the store, the flag table, the
settings, the CLI, the wiring, the start-up targets, the dashboard and the metrics learn every
kind and option from the specs (worker/sinks/registry.py). Adding a sink must not need an edit
in any module outside worker/sinks/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from worker.sinks.registry import specs

WORKER = Path(__file__).resolve().parent.parent / "worker"
# Every module outside worker/sinks/, by its path under worker/ without ".py".
GENERIC = sorted(
    str(path.relative_to(WORKER).with_suffix(""))
    for path in WORKER.rglob("*.py")
    if path.relative_to(WORKER).parts[0] != "sinks"
)
# What these modules may import from worker.sinks: the protocols, the registry and the
# contract, the user's handlers and the per-kind limits (which wrap any sink).
ALLOWED = {"base", "registry", "spec", "handlers", "limits"}


def _named(module: str) -> tuple[set[str], set[str], set[str]]:
    """The module's string constants, identifiers (names, attributes, keywords, fields) and
    the worker.sinks modules it imports."""
    tree = ast.parse((WORKER / f"{module}.py").read_text())
    strings, names, imports = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("worker.sinks"):
            parts = (node.module or "").split(".")[2:] or [a.name for a in node.names]
            imports.add(parts[0])
    return strings, names, imports


@pytest.mark.parametrize("module", GENERIC)
def test_the_generic_modules_name_no_sink(module: str) -> None:
    strings, names, imports = _named(module)
    assert imports <= ALLOWED, imports - ALLOWED
    for spec in specs():
        # The demo shows the email kind at work: it may say "email" and set its options.
        if module == "cli/demo" and "email" in spec.kinds:
            continue
        assert not strings & set(spec.kinds), (module, spec.kinds)
        for option in spec.options:
            assert option.name not in names | strings, (module, option.name)
            assert not any(option.flag in s or option.env in s for s in strings), (
                module,
                option.flag,
            )
