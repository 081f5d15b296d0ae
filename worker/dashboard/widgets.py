"""The dashboard's building blocks: rich renderables that fit themselves to the space rich
gives them (a line never wraps; what does not fit is left out, least important first)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from worker.observe.findings import BAD, OK, SLOT_BUSY, WARN, level
from worker.observe.stats import SlotView, Snapshot
from worker.units import fmt_duration

_BARS = " ▁▂▃▄▅▆▇█"


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
    """Sent per second over the last minute, across the whole width: each second as one or
    more cells (as many as fit, the same number give or take one), or several seconds
    averaged per cell when the width is less than a minute. ``height`` > 1 stacks the bars."""

    def __init__(self, values: Sequence[int], height: int = 1) -> None:
        self.values = list(values)
        self.height = max(1, height)

    def cells(self, width: int) -> list[float]:
        values: list[float] = [float(v) for v in self.values]
        if not values:
            return []
        if width >= len(values):
            return [values[i * len(values) // width] for i in range(width)]
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
