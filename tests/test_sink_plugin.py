"""A third-party sink, installed as its own distribution (tests/plugin_sink/, found through
the ``pg_outbox_relay.sinks`` entry-point group): its flag is in ``--help``, its kind
delivers through a real worker, and a plugin that claims a built-in kind is one line.

The plugin goes into a temporary directory put on the worker's PYTHONPATH only: the test
environment itself never has it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest

from tests.conftest import statuses_are, wait_until
from tests.test_cli import REPO, _env, _only_error, cli
from worker.producer import enqueue
from worker.store.sqlfiles import Names

PLUGIN = REPO / "tests" / "plugin_sink"


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """tests/plugin_sink built and installed (offline) into a directory of its own."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(PLUGIN)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    assert list(target.glob("outbox_file_sink-*.dist-info"))
    yield target


def _with(path: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(path)])}


def test_the_plugin_flag_is_in_the_help(plugin_dir: Path) -> None:
    result = cli("--help", env=_with(plugin_dir))
    assert result.returncode == 0, result.stderr
    assert " --file-sink-path FILE_SINK_PATH" in result.stdout
    assert "[env: OUTBOX_FILE_SINK_PATH]" in result.stdout
    assert "--file-sink-path" not in cli("--help").stdout  # not installed here


async def test_the_plugin_kind_delivers(
    plugin_dir: Path, pg_dsn: str, db, names: Names, tmp_path: Path
) -> None:
    out, log_file = tmp_path / "lines.jsonl", tmp_path / "worker.log"
    argv = [
        sys.executable, "-m", "worker", "--dsn", pg_dsn, "--schema", names.schema,
        "--poll-interval", "0.5", "--no-dashboard", "--file-sink-path", str(out),
    ]  # fmt: skip
    with log_file.open("w") as log:
        proc = await anyio.open_process(
            argv, stdout=log, stderr=log, env=_env(_with(plugin_dir)), cwd=REPO
        )
        try:
            async with db.transaction():
                ids = [
                    await enqueue(db, "file_line", payload, schema=names.schema)
                    for payload in ({"n": 1}, {"refuse": True}, {"n": 3})
                ]
            await wait_until(lambda: statuses_are(db, names, {"sent": 2, "dead": 1}), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                await proc.wait()
    output = log_file.read_text()
    assert proc.returncode == 0, output
    assert f"file_line: appending to {out}" in output
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert sorted((line["id"], line["payload"]) for line in lines) == [
        (ids[0], {"n": 1}),
        (ids[2], {"n": 3}),
    ]
    error = await db.fetchval(
        f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', ids[1]
    )
    assert error == "refused by the payload"


def _installed_by_hand(root: Path, name: str, module: str, code: str) -> Path:
    """A distribution as pip leaves it: the module and a dist-info with its entry point."""
    (root / f"{module}.py").write_text(code)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pg_outbox_relay.sinks]\n{name} = {module}:SPEC\n")
    return root


CLASHING = """
from worker.sinks.spec import SinkSpec
SPEC = SinkSpec(kinds=("email",), build=lambda ctx: None)
"""
NOT_A_SPEC = "SPEC = {'kinds': ['sms']}\n"


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (CLASHING, "sink plugin 'mine' (mine_sink:SPEC) declares kind 'email', which the "
         "built-in email sink has already"),
        (NOT_A_SPEC, "sink plugin 'mine' (mine_sink:SPEC) is a dict, not a "
         "worker.sinks.spec.SinkSpec"),
        ("import not_installed_anywhere\n", "sink plugin 'mine' (mine_sink:SPEC) cannot be "
         "loaded: ModuleNotFoundError: No module named 'not_installed_anywhere'"),
    ],
)  # fmt: skip
def test_a_bad_plugin_is_one_line(tmp_path: Path, code: str, error: str) -> None:
    path = _installed_by_hand(tmp_path, "mine", "mine_sink", code)
    for args in (["--help"], ["--dsn", "postgresql://x@127.0.0.1:1/x"]):
        assert _only_error(cli(*args, env=_with(path))) == error
