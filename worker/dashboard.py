"""The live terminal dashboard: ``render(snapshot)`` is pure, ``run_dashboard`` drives it.

An operator glancing at it should answer in two seconds: is it keeping up, is anything
stuck or failing, is the wake-up path healthy? The header's verdict says which, and each
number that is out of bounds is coloured with the same thresholds.

Rendering is a function of an immutable ``Snapshot`` and the space rich gives it, so it can
be tested by printing into ``Console(record=True, width=80, height=24)``. The live loop
draws on the event loop, ~7-10 ms a frame at 160x48, four frames a second. Not in a thread:
a thread rendering pure Python holds the GIL in 5 ms slices whenever the event loop gives it
up for I/O (a convoy), which cost the relay more throughput than drawing inline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import termios
import tty
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TextIO

import anyio
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from worker.findings import (
    BAD,
    BEHIND,
    DB_STALE,
    DEAD_TUPLES,
    DEAD_TUPLES_MIN,
    NOTIFY_QUEUE,
    OK,
    OLD_XACT,
    SLOT_BUSY,
    WARN,
    Finding,
    assess,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_latency,
    fmt_rate,
    level,
)
from worker.logs import scrub
from worker.relay import Relay
from worker.stats import SlotView, Snapshot

REFRESH_SECONDS = 0.25
_PER_INTENT = re.compile(r"intent \d+ ")

_BARS = " ▁▂▃▄▅▆▇█"


# --- the verdict ---------------------------------------------------------------------------


def verdict(snap: Snapshot, findings: Sequence[Finding], width: int = 40) -> Text:
    """The header's answer: each finding in its colour, worst first, as many as fit."""
    if snap.stopping:
        return Text(" STOPPING ", style="bold black on yellow")
    if not findings:
        busy = snap.busy_slots or snap.rate_now > 0
        return Text(" keeping up " if busy else " idle ", style="bold black on green")
    text = Text()
    for shown, finding in enumerate(findings):
        badge = Text(f" {finding.text} ", style=f"bold black on {finding.level}")
        rest = len(findings) - shown - 1
        more = len(f" +{rest}") if rest else 0
        if shown and text.cell_len + 1 + badge.cell_len + more > width:
            text.append(f" +{len(findings) - shown}", style="bold")
            break
        if shown:
            text.append(" ")
        text.append_text(badge)
    return text


# --- building blocks ---------------------------------------------------------------------------


class Parts:
    """Parts of one line joined by " · ". Parts come most important first; those that do not
    fit the width are left out, so a line never wraps."""

    def __init__(self, parts: Sequence[Text | str]) -> None:
        self.parts = [p if isinstance(p, Text) else Text(p) for p in parts if p]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line = Text(no_wrap=True, overflow="ellipsis", end="")
        for part in self.parts:
            sep = 3 if line else 0
            if line and line.cell_len + sep + part.cell_len > width:
                continue  # a shorter, less important part further on may still fit
            if line:
                line.append(" · ", style="dim")
            line.append_text(part)
        line.truncate(width, overflow="ellipsis")
        yield line


class Labelled:
    """Rows of ``label  content``; cheaper to draw than a table grid, which matters at four
    frames a second. Content of several lines (the tall sparkline) is indented under the
    first."""

    LABEL_WIDTH = 10

    def __init__(self, rows: Sequence[tuple[str | Text, RenderableType]]) -> None:
        self.rows = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width - self.LABEL_WIDTH)
        inner = options.update(width=width, height=None)
        blank = Text(" " * self.LABEL_WIDTH, end="")
        for label, content in self.rows:
            head = label if isinstance(label, Text) else Text(label, style="bold")
            head = head.copy()
            head.end = ""
            head.truncate(self.LABEL_WIDTH, pad=True)
            for n, line in enumerate(console.render_lines(content, inner, pad=False)):
                yield head if n == 0 else blank
                yield from line
                yield Segment.line()


class Sparkline:
    """Sent per second over the last minute, fitted to the width: two cells per second when
    there is room, two seconds per cell when there is not. ``height`` > 1 stacks the bars."""

    def __init__(self, values: Sequence[int], height: int = 1) -> None:
        self.values = list(values)
        self.height = max(1, height)

    def cells(self, width: int) -> list[float]:
        values: list[float] = [float(v) for v in self.values]
        if not values:
            return []
        if width >= 2 * len(values):
            return [v for v in values for _ in range(2)]
        step = math.ceil(len(values) / max(width, 1))
        if step > 1:
            values = [sum(values[i : i + step]) / step for i in range(0, len(values), step)]
        return values[-width:]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        cells = self.cells(options.max_width)
        top = max(cells, default=0.0)
        levels = len(_BARS) - 1
        total = self.height * levels
        eighths = [math.ceil(v / top * total) if top > 0 else 0 for v in cells]
        for row in range(self.height - 1, -1, -1):
            chars = "".join(_BARS[min(levels, max(0, e - row * levels))] for e in eighths)
            yield Text(chars, style="cyan", no_wrap=True, end="\n")


class SlotList:
    """The delivery slots, fitted to the space rich gives us: every slot in order when they
    fit (in several columns if the panel is wide), else the longest-running busy ones first
    and the rest summed up."""

    COLUMN_WIDTH = 30

    def __init__(self, slots: Sequence[SlotView | None]) -> None:
        self.slots = list(slots)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = max(1, options.height or len(self.slots))
        columns = max(1, options.max_width // self.COLUMN_WIDTH)
        room = rows * columns
        entries: list[tuple[str | Text, ...]]
        if len(self.slots) <= room:
            entries = [self._row(i, s) for i, s in enumerate(self.slots)]
        else:
            busy = sorted((s for s in self.slots if s is not None), key=lambda s: -s.seconds)
            shown = busy[: room - 1]
            idle = len(self.slots) - len(busy)
            rest = f"+{len(busy) - len(shown)} busy, " if len(busy) > len(shown) else ""
            entries = [self._row(s.index, s) for s in shown]
            entries.append(("", "", Text(f"{rest}{idle} idle", style="dim"), ""))
        columns = min(columns, math.ceil(len(entries) / rows)) or 1
        # Fixed widths from the content: rich's ratio columns would squeeze the others.
        widths = [max((Text(str(e[i])).cell_len for e in entries), default=0) for i in (0, 1, 3)]
        table = Table.grid(padding=(0, 1), expand=True)
        for c in range(columns):
            table.add_column(justify="right", style="dim", width=widths[0] + (2 if c else 0))
            table.add_column(justify="right", width=widths[1])
            table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
            table.add_column(justify="right", width=widths[2])
        for r in range(min(rows, len(entries))):
            cells: list[str | Text] = []
            for c in range(columns):
                k = c * rows + r
                cells.extend(entries[k] if k < len(entries) else ("", "", "", ""))
            table.add_row(*cells)
        yield table

    @staticmethod
    def _row(index: int, slot: SlotView | None) -> tuple[str | Text, ...]:
        if slot is None:
            return str(index), "", Text("idle", style="dim"), ""
        style = level(slot.seconds, SLOT_BUSY)
        return (
            str(index),
            f"#{slot.intent_id}",
            slot.kind,
            Text(fmt_duration(slot.seconds), style=style if style != OK else ""),
        )


class KindTable:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = max(1, (options.height or len(self.snap.kinds) + 1) - 1)
        table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
        table.add_column("kind", no_wrap=True, overflow="ellipsis", ratio=1)
        table.add_column("sent", justify="right", style="green")
        table.add_column("retried", justify="right", style="yellow")
        table.add_column("dead", justify="right", style="red")
        kinds = sorted(self.snap.kinds, key=lambda k: -(k.sent + k.retried + k.dead))
        shown = kinds if len(kinds) <= rows else kinds[: rows - 1]
        for k in shown:
            table.add_row(k.kind, f"{k.sent:,}", f"{k.retried:,}", f"{k.dead:,}")
        if len(shown) < len(kinds):
            table.add_row(Text(f"+{len(kinds) - len(shown)} more kinds", style="dim"))
        yield table if kinds else Text("nothing delivered yet", style="dim")


class ErrorList:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.snap.errors:
            yield Text("no errors in this run", style="dim")
            return
        errors = self.snap.errors[: options.height or len(self.snap.errors)]
        kind_width = max(len(e.kind) for e in errors)
        id_width = max(len(str(e.intent_id)) for e in errors) + 1
        for e in errors:
            at = datetime.fromtimestamp(e.at).strftime("%H:%M:%S")
            reason = " ".join(e.reason.split())  # one line, whatever the sink said
            line = Text.assemble(
                (at, "dim"),
                " ",
                (f"{e.outcome:<5}", BAD if e.outcome == "dead" else WARN),
                f" {e.kind:<{kind_width}} ",
                (f"{'#' + str(e.intent_id):>{id_width}}", "dim"),
                f" {reason}",
                no_wrap=True,
                overflow="ellipsis",
            )
            line.truncate(options.max_width, overflow="ellipsis")
            yield line


# --- the overview lines ------------------------------------------------------------------------


def _styled(text: str, lvl: str) -> Text:
    return Text(text, style="" if lvl == OK else f"bold {lvl}")


def throughput_line(snap: Snapshot) -> Parts:
    return Parts(
        [
            Text.assemble((fmt_rate(snap.rate_now), "bold"), " now"),
            f"{fmt_rate(snap.rate_minute)} last min",
            f"peak {max(snap.per_second, default=0):,}/s",
            f"{snap.sent:,} sent",
            f"{snap.claimed:,} claimed",
            f"{snap.released:,} released" if snap.released else "",
            _styled(f"{snap.lease_lost:,} leases lost", WARN) if snap.lease_lost else "",
        ]
    )


def latency_line(snap: Snapshot) -> Parts:
    lat = snap.latency
    if lat.count == 0:
        return Parts([Text("nothing sent in the last 60s", style="dim")])
    return Parts(
        [
            f"p50 {fmt_latency(lat.p50)}",
            Text.assemble("p95 ", (fmt_latency(lat.p95), "bold")),
            f"p99 {fmt_latency(lat.p99)}",
            Text(f"commit→sent, {lat.count:,} in 60s", style="dim"),
        ]
    )


def queue_line(snap: Snapshot) -> Parts:
    db = snap.db
    if db is None:
        if snap.db_error:
            return Parts([_styled(f"unavailable: {snap.db_error}", BAD)])
        return Parts([Text("waiting for the first database read", style="dim")])
    behind = level(db.oldest_due_seconds, BEHIND)
    oldest = (
        "nothing due"
        if db.oldest_due_seconds is None
        else f"oldest due {fmt_duration(db.oldest_due_seconds)}"
    )
    return Parts(
        [
            Text.assemble("due ", (fmt_count(db.pending_due, db.count_cap), "bold")),
            _styled(oldest, behind),
            f"scheduled {fmt_count(db.pending_later, db.count_cap)}",
            f"processing {fmt_count(db.processing, db.count_cap)}",
            _styled(f"dead {fmt_count(db.dead, db.count_cap)}", WARN if db.dead else OK),
            *(
                [
                    _styled(
                        f"keys halted {fmt_count(db.halted_keys, db.count_cap)} "
                        f"(oldest {db.oldest_halted_key!r}, "
                        f"{fmt_duration(db.oldest_halted_seconds)})",
                        BAD,
                    )
                ]
                if db.halted_keys
                else []
            ),
        ]
    )


def wakeup_line(snap: Snapshot) -> Parts:
    db = snap.db
    if not snap.listen:
        head = Text("polling only (--no-listen)", style="bold")
    elif snap.listener_connected:
        head = Text.assemble(("LISTEN ok", f"bold {OK}"), " ", _sleep_state(snap))
    else:
        head = _styled("LISTEN down: polling until it is back", BAD)
    usage = db.notify_queue_usage if db else None
    return Parts(
        [
            head,
            f"notify {fmt_duration(snap.since_notification)} ago"
            if snap.since_notification is not None
            else "no notify yet",
            _styled(
                f"{snap.listener_reconnects} reconnects",
                WARN if snap.listener_reconnects else OK,
            ),
            f"poll {fmt_duration(snap.since_poll)} ago"
            if snap.since_poll is not None
            else "no idle poll yet",
            _styled(f"queue {usage:.1%}", level(usage, NOTIFY_QUEUE)) if usage is not None else "",
            (f"{db.idle_workers} idle worker" + ("" if db.idle_workers == 1 else "s"))
            if db
            else "",
        ]
    )


def _sleep_state(snap: Snapshot) -> Text:
    # idle_declared: producers notify on our behalf; otherwise we are claiming on our own
    return Text("(asleep)" if snap.idle_declared else "(busy)", style="dim")


def database_line(snap: Snapshot) -> Parts:
    db = snap.db
    if db is None:
        return Parts([Text("-", style="dim")])
    parts: list[Text | str] = []
    holder = ""
    if db.oldest_xact_pid:
        app = f" ({db.oldest_xact_application})" if db.oldest_xact_application else ""
        holder = f"xact by pid {db.oldest_xact_pid}{app}"
    xact = level(db.oldest_xact_seconds, OLD_XACT)
    if db.oldest_xact_seconds is None:
        parts.append("no open xact")
    else:
        age = f"oldest xact {fmt_duration(db.oldest_xact_seconds)}"
        # who holds it matters once it is old: then it goes first, with the age
        parts.append(_styled(f"{age}, {holder}" if xact != OK and holder else age, xact))
    if db.dead_tuples is not None:
        total = db.dead_tuples + (db.live_tuples or 0)
        share = db.dead_tuples / total if total else 0.0
        bloat = level(share, DEAD_TUPLES) if db.dead_tuples >= DEAD_TUPLES_MIN else OK
        parts.append(_styled(f"dead tuples {db.dead_tuples:,} ({share:.0%})", bloat))
    parts.append(
        "never vacuumed"
        if db.last_autovacuum_seconds is None
        else f"vacuumed {fmt_duration(db.last_autovacuum_seconds)} ago"
    )
    if db.table_bytes is not None:
        parts.append(f"table {fmt_bytes(db.table_bytes)}")
    if db.server:
        parts.append(f"on {db.server}")
    if holder and xact == OK:
        parts.append(holder)
    if snap.db_age is not None:
        stale = level(snap.db_age, (DB_STALE, DB_STALE * 6))
        parts.append(_styled(f"read {fmt_duration(snap.db_age)} ago", stale))
    return Parts(parts)


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
            self.last_warning = scrub(f"{record.levelname.lower()}: {message}")


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
                snap = relay.stats.snapshot(listen=relay.settings.listen, stopping=relay.stopping)
                view = render(snap, title, logs.last_warning if logs else None)
                live.update(view, refresh=True)
                await anyio.sleep(refresh)
