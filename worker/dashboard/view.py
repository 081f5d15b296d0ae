"""The live terminal dashboard: ``render(snapshot)`` is pure, ``run_dashboard`` drives it.

An operator glancing at it should answer in two seconds: is it keeping up, is anything
stuck or failing, is the wake-up path healthy? The header's verdict says which, and each
number that is out of bounds is coloured with the same thresholds.

Rendering is a function of an immutable ``Snapshot`` and the space rich gives it, so it can
be tested by printing into ``Console(record=True, width=80, height=24)``. The live loop
draws on the event loop, ~7-10 ms a frame at 160x48, four frames a second. Not in a thread:
a thread rendering pure Python holds the GIL in 5 ms slices whenever the event loop gives it
up for I/O (a convoy), which cost the relay more throughput than drawing inline.

Here: the screen's layout and the live loop. The words (the verdict, the overview lines) are
in ``worker.dashboard.lines``, the renderables that fit them to the width in
``worker.dashboard.widgets``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import termios
import tty
from collections import deque
from collections.abc import Iterator
from typing import TextIO

import anyio
from rich.console import Console, ConsoleOptions, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from worker.dashboard.lines import (
    database_line,
    latency_line,
    queue_line,
    throughput_line,
    verdict,
    wakeup_line,
)
from worker.dashboard.widgets import ErrorList, KindTable, Labelled, SlotList, Sparkline
from worker.logs import redact_text
from worker.observe.findings import assess
from worker.observe.stats import Snapshot
from worker.relay.core import Relay
from worker.units import fmt_duration

REFRESH_SECONDS = 0.25
_PER_INTENT = re.compile(r"intent \d+ ")


# --- the whole screen ------------------------------------------------------------------------


class Dashboard:
    """The full screen for one snapshot; lays itself out for the size rich gives it."""

    def __init__(self, snap: Snapshot, title: str, notice: str | None = None) -> None:
        self.snap = snap
        self.title = title
        self.notice = notice

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        snap = self.snap
        spark_height = 1 if height < 36 else 3  # a taller bar chart when there is room

        overview = Labelled(
            [
                ("Sent/s", throughput_line(snap)),
                (Text("last 60s", style="dim"), Sparkline(snap.per_second, spark_height)),
                ("Latency", latency_line(snap)),
                ("Queue", queue_line(snap)),
                ("Wake-up", wakeup_line(snap)),
                ("Database", database_line(snap)),
            ]
        )
        overview_height = 5 + spark_height + 2

        # What is left goes to the slots and kinds, and about a third of it to the errors.
        errors_rows = max(1, min(10, (height - overview_height - 1) // 4))
        layout = Layout()
        layout.split_column(
            Layout(self._header(snap, options.max_width), size=1),
            Layout(Panel(overview, border_style="blue"), size=overview_height),
            Layout(name="middle", ratio=1, minimum_size=3),
            Layout(
                Panel(
                    ErrorList(snap),
                    title="Recent errors",
                    title_align="left",
                    subtitle=self._footer(snap, options.max_width),
                    subtitle_align="right",
                    border_style="red" if snap.errors else "blue",
                ),
                size=errors_rows + 2,
            ),
        )
        layout["middle"].split_row(
            Layout(
                Panel(
                    SlotList(snap.slots),
                    title=f"Slots {snap.busy_slots}/{snap.concurrency} busy",
                    title_align="left",
                    border_style="blue",
                )
            ),
            Layout(
                Panel(
                    KindTable(snap),
                    title="Kinds (this run)",
                    title_align="left",
                    border_style="blue",
                )
            ),
        )
        yield from layout.__rich_console__(console, options.update(height=height))

    def _header(self, snap: Snapshot, width: int) -> Table:
        grid = Table.grid(expand=True)
        grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        grid.add_column(justify="right", no_wrap=True)
        left = Text.assemble(
            (self.title, "bold"),
            (f"  {snap.concurrency} slots · up {fmt_duration(snap.uptime)}", "dim"),
        )
        grid.add_row(left, verdict(snap, assess(snap), max(30, width // 2)))
        return grid

    def _footer(self, snap: Snapshot, width: int) -> Text:
        if snap.stopping:
            text = Text.assemble(
                (" stopping: ", "bold yellow"),
                f"{snap.busy_slots} in flight; q/Ctrl-C again cancels them ",
            )
        else:
            text = Text(" q or Ctrl-C: stop gracefully ", style="dim")
        room = width - text.cell_len - 8  # the panel's corners and some border
        if self.notice and room > 10:
            notice = Text(f" {self.notice} ", style="yellow", no_wrap=True)
            notice.truncate(room, overflow="ellipsis")
            text = Text.assemble(notice, ("│", "dim"), text)
        return text


def render(snap: Snapshot, title: str = "outbox-worker", notice: str | None = None) -> Dashboard:
    """The dashboard for ``snap``: pure, print it to any rich Console."""
    return Dashboard(snap, title, notice)


def frame(relay: Relay, title: str, notice: str | None = None) -> Dashboard:
    """The dashboard for the relay as it is now: what the live loop draws at each refresh
    (and what ``bench.screenshots`` prints into an SVG)."""
    snap = relay.stats.snapshot(listen=relay.settings.listen, stopping=relay.stopping)
    return render(snap, title, notice)


# --- the live loop -----------------------------------------------------------------------------


class _LogBuffer(logging.Handler):
    """Holds log records while the dashboard owns the terminal (a line written to the
    screen would tear it); they are replayed to the real handlers when it closes."""

    def __init__(self, keep: int = 30) -> None:
        super().__init__(logging.DEBUG)
        self.records: deque[logging.LogRecord] = deque(maxlen=keep)
        self.dropped = 0
        self.last_warning: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) == self.records.maxlen:
            self.dropped += 1
        self.records.append(record)
        message = record.getMessage()
        # One intent's failure is in the errors panel already; the notice is for the rest
        # (database down, listener lost, leases lost...).
        if record.levelno >= logging.WARNING and not _PER_INTENT.match(message):
            self.last_warning = redact_text(f"{record.levelname.lower()}: {message}")


@contextlib.contextmanager
def _logs_held_back() -> Iterator[_LogBuffer]:
    root = logging.getLogger()
    saved = root.handlers[:]
    buffer = _LogBuffer()
    root.handlers[:] = [buffer]
    try:
        yield buffer
    finally:
        root.handlers[:] = saved
        if buffer.dropped:
            logging.getLogger("outbox.dashboard").info(
                "%d earlier log lines not shown (run with 2>FILE to keep every line)",
                buffer.dropped,
            )
        for record in buffer.records:
            for handler in saved:
                if record.levelno >= handler.level:
                    handler.handle(record)


@contextlib.contextmanager
def _keys_unbuffered(fd: int | None) -> Iterator[None]:
    """Single keys without Enter and without echo; Ctrl-C still raises SIGINT (cbreak keeps
    ISIG), so it reaches the same signal handler as a SIGTERM. Restored on the way out."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _foreground_tty(stream: TextIO | None) -> int | None:
    """The stream's fd if it is a terminal we are in the foreground of: a background job
    that changed the terminal's modes or read from it would be stopped (SIGTTOU/SIGTTIN)."""
    if stream is None or not stream.isatty():
        return None
    fd = stream.fileno()
    try:
        return fd if os.tcgetpgrp(fd) == os.getpgrp() else None
    except OSError:
        return None


def request_stop(relay: Relay) -> None:
    """The two-phase shutdown, as for SIGTERM: first stop claiming, then cancel in-flight."""
    if relay.stopping:
        relay.hard_stop()
    else:
        relay.stop()


async def _read_keys(fd: int, relay: Relay) -> None:
    while True:
        await anyio.wait_readable(fd)
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            continue
        if not data:  # the terminal went away: nothing more to read
            return
        if b"q" in data.lower():
            request_stop(relay)


STDIN = -1  # run_dashboard's default keyboard: standard input, if it is a terminal


async def run_dashboard(
    relay: Relay,
    *,
    title: str | None = None,
    console: Console | None = None,
    refresh: float = REFRESH_SECONDS,
    keyboard_fd: int | None = STDIN,
) -> None:
    """Show the dashboard until cancelled (the owner cancels it once the relay has stopped).

    ``q`` on ``keyboard_fd`` stops the relay as a SIGTERM does. On the way out the screen,
    the cursor and the terminal modes are restored, and the log lines held back meanwhile
    are written.
    """
    console = console or Console()
    title = title or f"outbox-worker {relay.worker_id} · {relay.settings.schema}"
    if keyboard_fd == STDIN:
        keyboard_fd = _foreground_tty(sys.stdin)
    hold_logs = console.is_terminal and sys.stderr is not None and sys.stderr.isatty()
    live = Live(
        console=console,
        screen=True,
        auto_refresh=False,  # we refresh from the event loop, on snapshots
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with (
        _logs_held_back() if hold_logs else contextlib.nullcontext(None) as logs,
        _keys_unbuffered(keyboard_fd),
        live,
    ):
        async with anyio.create_task_group() as tg:
            if keyboard_fd is not None:
                tg.start_soon(_read_keys, keyboard_fd, relay)
            while True:
                view = frame(relay, title, logs.last_warning if logs else None)
                live.update(view, refresh=True)
                await anyio.sleep(refresh)
