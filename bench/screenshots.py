"""``python -m bench.screenshots``: the dashboard's pictures for the docs, from real runs.

    python -m bench.screenshots                     # both pictures, about 2.5 minutes
    python -m bench.screenshots demo --seconds 40   # one of them, shorter
    python -m bench.screenshots --dsn postgresql://postgres@127.0.0.1/postgres

Each picture runs ``outbox-worker demo`` (worker/cli/demo.py) in this process: a producer
committing sample intents, the in-process SMTP server, the demo's flaky handler, some
intents failing on purpose. After ``--seconds`` the dashboard's current frame
(``worker.dashboard.view.frame``, what the live loop draws) is printed into a recording rich
Console of ``--width`` x ``--height`` and saved as DOCS/images/NAME.svg.

- ``dashboard``: the demo as shipped, 8 slots, ~20 intents/s.
- ``dashboard-trouble``: three times the traffic into 2 slots, so a backlog grows; a second
  connection (named ``psql``: it stands for a session someone left open) holds a transaction
  open from the start, which holds back vacuum; the worker's LISTEN connection is killed
  with ``pg_terminate_backend`` 15 s before the picture, so it shows one reconnect.

Against --dsn, else DATABASE_URL, else the local server at 127.0.0.1:5432, else an embedded
PostgreSQL. Uses the schema ``outbox_demo_pictures`` (emptied at the start).
"""

from __future__ import annotations

import argparse
import io
import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
from rich.console import Console, RenderableType

from worker.cli.demo import DemoOptions, run_demo
from worker.cli.embedded import any_database
from worker.dashboard.view import frame
from worker.eventloop import backend_options
from worker.observe.health import HealthMonitor
from worker.relay.core import Relay
from worker.store.db import connect, create_pool

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
SCHEMA = "outbox_demo_pictures"
DASHBOARD_TITLE = "outbox-worker demo"  # what `outbox-worker demo` shows in the header
LISTENER_KILLED_BEFORE = 15.0  # seconds before the picture: long enough to be back up


@dataclass(frozen=True)
class Picture:
    name: str  # the file is IMAGES/<name>.svg
    caption: str  # the SVG window's title
    options: DemoOptions
    seconds: float  # how long the demo runs before the picture
    trouble: bool = False


PICTURES = {
    p.name: p
    for p in (
        Picture(
            "dashboard",
            "outbox-worker demo: the dashboard after a minute of sample traffic",
            DemoOptions(concurrency=8, rate=20.0, dashboard=False, schema=SCHEMA),
            seconds=55.0,
        ),
        Picture(
            "dashboard-trouble",
            "outbox-worker in trouble: a backlog, a transaction held open, LISTEN reconnected",
            DemoOptions(concurrency=2, rate=60.0, dashboard=False, schema=SCHEMA),
            seconds=80.0,  # the held transaction is flagged once it is 60 s old
            trouble=True,
        ),
    )
}


def to_svg(view: RenderableType, caption: str, width: int, height: int) -> str:
    """``view`` as a terminal of ``width`` x ``height`` in colour would show it."""
    console = Console(
        record=True,
        width=width,
        height=height,
        file=io.StringIO(),  # recorded, not shown
        force_terminal=True,
        color_system="truecolor",
    )
    console.print(view)
    return console.export_svg(title=caption)


async def hold_transaction(dsn: str) -> None:
    """An open transaction with a transaction id, until cancelled: vacuum cannot remove any
    row deleted or updated after it began."""
    conn = await connect(dsn, server_settings={"application_name": "psql"})
    try:
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT txid_current()")
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()  # the transaction ends with the connection


async def kill_listener(dsn: str, relay: Relay, delay: float) -> None:
    await anyio.sleep(delay)
    conn = await connect(dsn)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            f"outbox-worker listener {relay.worker_id}",
        )
    finally:
        await conn.close()
    logging.getLogger("bench.screenshots").info("killed %d LISTEN connection(s)", killed)


async def _started(holder: list[Relay]) -> Relay:
    with anyio.fail_after(60):  # the demo migrates its schema and opens its pool first
        while not holder:  # noqa: ASYNC110 - run_worker appends it, and sets no event
            await anyio.sleep(0.1)
    return holder[0]


async def take(dsn: str, picture: Picture, width: int, height: int) -> str:
    """Run the demo for ``picture.seconds`` and return the dashboard as it is then, in SVG."""
    holder: list[Relay] = []
    async with anyio.create_task_group() as demo:
        demo.start_soon(partial(run_demo, dsn, picture.options, holder))
        relay = await _started(holder)
        # `outbox-worker demo` reads the database side once a second beside the dashboard
        # (worker/cli/app.py); without a terminal it does not, so do it here.
        pool = await create_pool(dsn, max_size=1, application_name="outbox-worker dashboard")
        try:
            async with anyio.create_task_group() as beside:
                beside.start_soon(HealthMonitor(pool, relay.store, relay.stats).run)
                if picture.trouble:
                    beside.start_soon(hold_transaction, dsn)
                    delay = max(0.0, picture.seconds - LISTENER_KILLED_BEFORE)
                    beside.start_soon(kill_listener, dsn, relay, delay)
                await anyio.sleep(picture.seconds)
                svg = to_svg(frame(relay, DASHBOARD_TITLE), picture.caption, width, height)
                beside.cancel_scope.cancel()
        finally:
            await pool.close()
            relay.stop()  # run_demo returns once the relay has stopped
    return svg


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.screenshots", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(PICTURES)}")
    parser.add_argument("--dsn", help="default: DATABASE_URL, the local server, or embedded")
    parser.add_argument("--seconds", type=float, help="run this long before each picture")
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--height", type=int, default=30)
    parser.add_argument("--out", type=Path, default=IMAGES, help=f"default: {IMAGES}")
    args = parser.parse_args()
    unknown = set(args.names) - set(PICTURES)
    if unknown:
        parser.error(f"no picture named {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # The demo's failures are on purpose: their lines are noise here.
    for noisy in ("outbox", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    with any_database(args.dsn) as dsn:
        for name in args.names or list(PICTURES):
            picture = PICTURES[name]
            if args.seconds is not None:
                picture = replace(picture, seconds=args.seconds)
            svg = anyio.run(
                take, dsn, picture, args.width, args.height, backend_options=backend_options()
            )
            path = args.out / f"{name}.svg"
            path.write_text(svg, encoding="utf-8")
            print(f"{path}: {path.stat().st_size:,} bytes, after {picture.seconds:g} s")


if __name__ == "__main__":
    main()
