"""Results out: rich tables, the targets of issue 4 checked, a JSON file, a CDF plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from bench.figures import Row, percentile

_UNITS = {
    "intents_per_s": ("intents/s", 0),
    "achieved_per_s": ("achieved/s", 0),
    "commits_per_s": ("commits/s", 0),
    "worker_cpu": ("worker CPU %", 0),
    "pg_cpu": ("PG CPU %", 0),
    "p50_ms": ("p50 ms", 2),
    "p95_ms": ("p95 ms", 2),
    "p99_ms": ("p99 ms", 2),
    "max_ms": ("max ms", 1),
    "bound_ms": ("poll+100 ms", 0),
    "vs_no_trigger": ("× no trigger", 2),
    "vs_naive": ("× naive", 1),
    "notifications": ("NOTIFYs heard", 0),
    "wake_p50_ms": ("wake-up p50 ms", 1),
    "wake_p99_ms": ("wake-up p99 ms", 1),
    "queries_per_s": ("queries/s", 2),
    "queries_per_poll": ("queries/poll", 2),
    "claims_per_poll": ("claims/poll", 2),
    "shortest_gap_s": ("shortest claim gap s", 2),
}


def _number(value: float, digits: int) -> str:
    if math.isnan(value):
        return "–"
    if digits == 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cell(summary: dict[str, float], digits: int) -> str:
    median, low, high = summary["median"], summary["min"], summary["max"]
    text = _number(median, digits)
    if low != high:
        text += f" ({_number(low, digits)}–{_number(high, digits)})"
    return text


def scenario_table(title: str, metrics: Sequence[str], rows: Sequence[Row]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("configuration")
    present = [m for m in metrics if any(m in r.summary() for r in rows)]
    for metric in present:
        table.add_column(_UNITS.get(metric, (metric, 2))[0], justify="right")
    for row in rows:
        summary = row.summary()
        table.add_row(
            row.label,
            *(cell(summary[m], _UNITS.get(m, (m, 2))[1]) if m in summary else "" for m in present),
        )
    return table


def markdown_table(metrics: Sequence[str], rows: Sequence[Row]) -> str:
    present = [m for m in metrics if any(m in r.summary() for r in rows)]
    head = ["configuration", *(_UNITS.get(m, (m, 2))[0] for m in present)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        summary = row.summary()
        cells = [
            cell(summary[m], _UNITS.get(m, (m, 2))[1]) if m in summary else "" for m in present
        ]
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    return "\n".join(lines)


# --- targets -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this invocation


def _find(rows: Iterable[Row], scenario: str, test: Callable[[Row], bool]) -> list[Row]:
    return [r for r in rows if r.scenario == scenario and test(r)]


def _run_ratios(a: Row, b: Row, metric: str) -> list[float]:
    return [x[metric] / y[metric] for x, y in zip(a.runs, b.runs, strict=False)]


def targets(rows: Sequence[Row]) -> list[Target]:
    out: list[Target] = []
    # Drain >= 3x pgqueuer's best, same run (the alternatives scenario measures both).
    relay = _find(
        rows,
        "alternatives",
        lambda r: r.params.get("test") == "drain" and r.params["system"] == "outbox-worker",
    )
    pgq = _find(
        rows,
        "alternatives",
        lambda r: r.params.get("test") == "drain" and r.params["system"] == "pgqueuer",
    )
    if relay and pgq:
        best = max(pgq, key=lambda r: r.median("intents_per_s"))
        ratio = statistics.median(_run_ratios(relay[0], best, "intents_per_s"))
        out.append(
            Target(
                "drain throughput",
                "≥ 3× pgqueuer's best (aim ≥ 20,000/s)",
                f"{relay[0].median('intents_per_s'):,.0f}/s = {ratio:.1f}× pgqueuer "
                f"({best.label.split(', ')[-1]})",
                ratio >= 3,
            )
        )
    lat = _find(
        rows, "latency", lambda r: r.params.get("rate") == 1000 and bool(r.params.get("listen"))
    )
    if lat:
        p50, p99 = lat[0].median("p50_ms"), lat[0].median("p99_ms")
        out.append(
            Target(
                "latency at 1,000/s",
                "p50 ≤ 2 ms, p99 ≤ 10 ms",
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                p50 <= 2 and p99 <= 10,
            )
        )
    alt_lat = _find(rows, "alternatives", lambda r: r.params.get("test") == "latency")
    mine = [r for r in alt_lat if r.params["system"] == "outbox-worker"]
    others = [r for r in alt_lat if r.params["system"] != "outbox-worker"]
    if mine and others:
        text = ", ".join(
            f"{r.params['system']} p50 {r.median('p50_ms'):.1f} / p99 {r.median('p99_ms'):.1f} ms"
            for r in others
        )
        met = all(mine[0].median(m) < r.median(m) for r in others for m in ("p50_ms", "p99_ms"))
        out.append(
            Target(
                "latency vs alternatives",
                "lower than pgqueuer's and procrastinate's",
                f"outbox-worker p50 {mine[0].median('p50_ms'):.1f} / p99 "
                f"{mine[0].median('p99_ms'):.1f} ms; {text}",
                met,
            )
        )
    lost = _find(rows, "lost-notification", lambda r: True)
    if lost:
        worst = max(r["max_ms"] for r in lost[0].runs)
        bound = lost[0].runs[0]["bound_ms"]
        out.append(
            Target(
                "lost notification",
                "delivered within poll interval + 100 ms",
                f"worst {worst:.0f} ms (bound {bound:.0f} ms)",
                worst <= bound,
            )
        )
    idle = _find(rows, "idle", lambda r: r.params.get("system") == "outbox-worker")
    if idle:
        # The poll is jittered (by at most ±20 %): no claim sooner than 0.8 poll intervals
        # after the previous one means every claim was the poll's own, none extra.
        poll = idle[0].params["poll"]
        shortest = min(r.get("shortest_gap_s", math.nan) for r in idle[0].runs)
        out.append(
            Target(
                "idle",
                "≤ 1 claim query per poll interval per process",
                f"{idle[0].median('claims_per_poll'):.2f} claims per poll interval; shortest "
                f"gap between claims {shortest:.2f} s (poll {poll:g} s, jittered)",
                shortest >= 0.8 * poll,
            )
        )
    email = _find(rows, "email", lambda r: r.params.get("sink") == "email")
    if email:
        top_c = max(r.params["concurrency"] for r in email)
        tops = [r for r in email if r.params["concurrency"] == top_c]
        out.append(
            Target(
                f"email at concurrency {top_c}",
                "≥ 5× the naive loop (at concurrency 32)",
                "; ".join(
                    f"{'STARTTLS' if r.params.get('starttls') else 'plain'} "
                    f"{r.median('intents_per_s'):,.0f}/s = {r.median('vs_naive'):.1f}× naive"
                    for r in tops
                ),
                all(r.median("vs_naive") >= 5 for r in tops),
            )
        )

    def cost_row(variant: str, producers: int) -> Row | None:
        found = _find(
            rows,
            "producer-cost",
            lambda r: r.params.get("variant") == variant and r.params.get("producers") == producers,
        )
        return found[0] if found else None

    counts = [r.params["producers"] for r in rows if "producers" in r.params]
    main_row = cost_row("main", max(counts)) if counts else None
    if main_row is not None:
        n = main_row.params["producers"]
        ratio = main_row.median("vs_no_trigger")
        always = cost_row("always", n)
        extra = f"; always-notify: {always.median('vs_no_trigger'):.2f}×" if always else ""
        wake = _find(
            rows,
            "producer-cost",
            lambda r: r.params.get("variant") == "main" and "rate" in r.params,
        )
        if wake:
            extra += (
                f"; wake-up at {wake[0].params['rate']}/s p50 "
                f"{wake[0].median('wake_p50_ms'):.1f} ms"
            )
        out.append(
            Target(
                f"producer cost at {n} producers",
                "≥ 90 % of the no-trigger commit rate (at 16 producers)",
                f"main's trigger: {ratio:.2f}× no trigger{extra}",
                ratio >= 0.9,
            )
        )
    return out


def targets_table(found: Sequence[Target]) -> Table:
    table = Table(title="Targets of issue 4", title_justify="left")
    for column in ("target", "goal", "measured (median of runs)", "met"):
        table.add_column(column)
    for t in found:
        table.add_row(t.name, t.goal, t.measured, {True: "yes", False: "NO", None: "–"}[t.met])
    return table


# --- files -------------------------------------------------------------------------------


def cdf_points(samples_ms: Sequence[float], points: int = 200) -> list[list[float]]:
    """A compact CDF (value, fraction) for the JSON file; the plot uses every sample."""
    values = sorted(samples_ms)
    if not values:
        return []
    fractions = [i / points for i in range(1, points + 1)]
    return [[percentile(values, f * 100), f] for f in fractions]


def write_json(
    path: Path, meta: dict[str, Any], rows: Sequence[Row], found: Sequence[Target]
) -> None:
    document = {
        "meta": meta,
        "rows": [
            {**r.to_json(), "latency_cdf_ms": cdf_points(r.samples_ms)}
            if r.samples_ms
            else r.to_json()
            for r in rows
        ],
        "targets": [t.__dict__ for t in found],
    }
    path.write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )


_PLOT_MIN_MS = 0.1


def plot_cdfs(path: Path, rows: Sequence[Row], subtitle: str) -> bool:
    """CDF of commit -> handler start, one panel per question. False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        ("the relay under steady load", [r for r in rows if r.scenario == "latency"]),
        ("same rate, the alternatives", [r for r in rows if r.scenario == "alternatives"]),
        ("LISTEN connection killed", [r for r in rows if r.scenario == "lost-notification"]),
        ("wake-up at low load, by trigger", [r for r in rows if r.scenario == "producer-cost"]),
    ]
    panels = [(t, [r for r in rs if r.samples_ms]) for t, rs in panels]
    panels = [(t, rs) for t, rs in panels if rs]
    if not panels:
        return False
    columns = min(2, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(7 * columns, 4.4 * rows_of_panels), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, panel_rows) in zip(axes.flat, panels, strict=False):
        for row in panel_rows:
            # A handler can start a hair before the producer has seen its COMMIT return
            # (the row is visible first); such values sit at the left edge.
            values = sorted(max(v, _PLOT_MIN_MS) for v in row.samples_ms)
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=row.label)
        ax.set_xscale("log")
        ax.set_xlim(left=_PLOT_MIN_MS)
        ax.set_xlabel("commit → handler start (ms, log scale)")
        ax.set_ylabel("fraction of intents")
        ax.set_ylim(0, 1.01)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")
    fig.suptitle(f"outbox-worker latency distributions — {subtitle}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_all(
    console: Console,
    sections: Sequence[tuple[str, Sequence[str], Sequence[Row]]],
    found: Sequence[Target],
) -> None:
    for title, metrics, rows in sections:
        if rows:
            console.print(scenario_table(title, metrics, rows))
    if found:
        console.print(targets_table(found))
