"""The old relay as a baseline (``--baseline REV``): a commit checked out in a git worktree,
whose own ``bench/child.py`` and ``worker`` package run the worker child, on a schema its
own migrations created. The parent drives it like any other system (bench/drive.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson

from bench.proc import tree_env
from bench.server import fresh_schema
from bench.sql import query
from bench.systems import Installed, RelaySystem

DEFAULT_REV = "af30941"  # main before the relay pipeline rewrite
_REPO = Path(__file__).resolve().parent.parent

# What the parent's side (bench/proc.py) relies on in a child: the events and commands of
# the JSON-lines protocol, and the relay kind.
_PROTOCOL = (
    '"ready"', '"running"', '"handled"', '"info"', '"stopped"',
    '"go"', '"wait"', '"stop"', '"relay": RelayWorker',
)  # fmt: skip

# Run inside the baseline checkout: where its modules come from, and its relay defaults.
_PROBE = """
import dataclasses, json, bench.child, worker
from worker.settings import Settings
print(json.dumps({"worker": worker.__file__, "child": bench.child.__file__,
    "defaults": {f.name: f.default for f in dataclasses.fields(Settings)
                 if f.name in ("concurrency", "batch_size", "poll_interval")}}))
"""


class Unavailable(Exception):
    """The baseline cannot be run; the message says why, in one line."""


def _git(*args: str, cwd: Path = _REPO) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=120
        )
    except FileNotFoundError:
        raise Unavailable("git is not installed") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr.strip().splitlines() or ["?"])[-1]
        raise Unavailable(f"git {' '.join(args)}: {last}") from None
    return done.stdout.strip()


def checkout(rev: str) -> tuple[str, Path]:
    """The commit of ``rev`` and a worktree of it (``git worktree add --detach`` under the
    temp directory when missing; reused when it is already there at that commit)."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.gettempdir()) / f"outbox-worker-baseline-{sha[:12]}"
    if path.exists():
        if _git("rev-parse", "HEAD", cwd=path) != sha:
            raise Unavailable(f"{path} exists but is not a checkout of {sha[:12]}")
    else:
        # --force: a worktree of this path removed without `git worktree remove` is still
        # registered, and git would refuse the path otherwise.
        _git("worktree", "add", "--force", "--detach", str(path), sha)
    return sha, path


def probe(tree: Path) -> dict[str, Any]:
    """Check that the checkout's child speaks our protocol and imports from the checkout;
    its relay's defaults."""
    child = tree / "bench" / "child.py"
    if not child.is_file():
        raise Unavailable(f"{child} does not exist")
    text = child.read_text()
    missing = [m for m in _PROTOCOL if m not in text]
    if missing:
        raise Unavailable(f"{child} lacks the child protocol's {', '.join(missing)}")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tree, env=tree_env(tree),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if done.returncode != 0:
        raise Unavailable(f"its bench.child does not import: {done.stderr.strip()[-300:]}")
    found: dict[str, Any] = orjson.loads(done.stdout)
    for module in ("worker", "child"):
        if not Path(found[module]).resolve().is_relative_to(tree.resolve()):
            raise Unavailable(f"{module} imported from {found[module]}, not from {tree}")
    found["same_child"] = text == (_REPO / "bench" / "child.py").read_text()
    return found


class BaselineRelaySystem(RelaySystem):
    """The relay of another commit: its schema, triggers, child and defaults."""

    kind = "relay"

    def __init__(self, sha: str, tree: Path, defaults: dict[str, Any]) -> None:
        self.name = f"outbox-worker {sha[:7]}"
        self.sha = sha
        self.tree: Path | None = tree
        self.defaults = defaults
        self._queries = tree / "bench" / "queries.sql"

    @contextlib.asynccontextmanager
    async def install(self, dsn: str) -> AsyncIterator[Installed]:
        async with fresh_schema(dsn, "base", outbox=False) as names:
            assert self.tree is not None
            await anyio.run_process(
                [sys.executable, "-m", "worker", "migrate", "--dsn", dsn,
                 "--schema", names.schema, "--channel", names.channel],
                cwd=self.tree, env=tree_env(self.tree),
            )  # fmt: skip
            yield Installed(dsn, names)

    async def seed(self, conn: asyncpg.Connection, inst: Installed, n: int) -> None:
        await conn.execute(query("seed", inst.names, path=self._queries), n, "bench")

    def unfinished_sql(self, inst: Installed) -> str:
        return query("unfinished", inst.names, path=self._queries)

    def default(self, setting: str) -> Any:
        return self.defaults[setting]


def resolve(rev: str | None, *, tiny: bool) -> tuple[BaselineRelaySystem | None, str]:
    """The baseline system and one line about it; None (and why) when it is skipped.

    Skipped on request (``--baseline none``), at the tiny size unless a REV was given, and
    at the tiny size when it cannot be run; at full size that raises ``Unavailable``."""
    if rev == "none":
        return None, "baseline: skipped (--baseline none)"
    if tiny and rev is None:
        return None, "baseline: skipped at --size tiny (pass --baseline REV to include it)"
    rev = rev or DEFAULT_REV
    try:
        sha, tree = checkout(rev)
        found = probe(tree)
    except Unavailable as exc:
        if tiny:
            return None, f"baseline {rev}: skipped, {exc}"
        raise Unavailable(f"baseline {rev}: {exc}") from None
    same = "the same bench/child.py as ours" if found["same_child"] else "its own bench/child.py"
    return BaselineRelaySystem(sha, tree, found["defaults"]), (
        f"baseline {rev} = {sha[:12]} in {tree} ({same}; defaults {found['defaults']})"
    )
