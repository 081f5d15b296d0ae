"""Imports point one way. Each part of worker/ may import, at run time, only the parts below it
(imports under ``if TYPE_CHECKING:`` are annotations, not dependencies):

    cli  ->  dashboard  ->  relay  ->  observe  ->  sinks  ->  store  ->  the basics

The basics are the top-level modules (errors, intent, outcome, settings, logs, units, ...):
they import nothing of worker/ beyond each other. ``worker/__init__.py`` (the public names),
``__main__`` and ``producer`` (the helper applications call) sit outside the ladder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent.parent / "worker"
LADDER = ["basics", "store", "sinks", "observe", "relay", "dashboard", "cli"]
OUTSIDE = {"__init__", "__main__", "producer"}
# Below observe in the ladder but part of its package: the trace context every message
# carries and its spans (sinks put it on their messages), and the outage lines (the store and
# the sinks share them).
LEAVES = {"observe.tracing": "sinks", "observe.otel": "sinks", "observe.outage": "store"}


def _part(module: str) -> str:
    """worker.relay.core -> relay; worker.errors -> basics."""
    parts = module.split(".")[1:]
    dotted = ".".join(parts[:2])
    if dotted in LEAVES:
        return LEAVES[dotted]
    if len(parts) > 1 or (WORKER / parts[0]).is_dir():
        return parts[0]
    return "outside" if parts[0] in OUTSIDE else "basics"


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("worker"):
            if node.module == "worker":  # from worker import logs
                found |= {f"worker.{alias.name}" for alias in node.names}
            else:
                found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("worker.")}
    return found


MODULES = sorted(
    str(path.relative_to(WORKER.parent).with_suffix("")).replace("/", ".")
    for path in WORKER.rglob("*.py")
)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_ladder(module: str) -> None:
    own = _part(module)
    if own == "outside":
        return
    path = WORKER.parent / (module.replace(".", "/") + ".py")
    upward = {
        imported
        for imported in _runtime_imports(path)
        if _part(imported) not in ("outside", own)
        and LADDER.index(_part(imported)) > LADDER.index(own)
    }
    assert not upward, f"{module} ({own}) imports from above it: {sorted(upward)}"
