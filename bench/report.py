"""Results out: rich tables, the targets of issue 9 checked, a JSON file, a CDF plot."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    "vs_pgqueuer_best": ("× pgqueuer best", 2),
    "worker_us_per_intent": ("worker CPU µs/intent", 1),
    "cpu_vs_baseline": ("CPU × baseline", 2),
    "p50_vs_pgqueuer": ("p50 × pgqueuer", 2),
    "p99_vs_pgqueuer": ("p99 × pgqueuer", 2),
    "vs_sink_alone": ("× sink alone", 2),
    "vs_relay": ("× without --limits", 2),
    "vs_unordered": ("× unordered", 2),
    "vs_without": ("× without --http", 3),
    "scrapes": ("scrapes", 0),
    "notifications": ("NOTIFYs heard", 0),
    "wake_p50_ms": ("wake-up p50 ms", 1),
    "wake_p99_ms": ("wake-up p99 ms", 1),
    "queries_per_s": ("queries/s", 2),
    "queries_per_poll": ("queries/poll", 2),
    "claims_per_poll": ("claims/poll", 2),
    "shortest_gap_s": ("shortest claim gap s", 2),
    "seconds": ("seconds", 1),
    "seed_s": ("seed s", 1),
    "claim_ms": ("claim of 100 ms", 2),
    "claim_halfway_ms": ("claim ms half-way", 2),
    "index_scan": ("index scan (1 = yes)", 0),
    "rss_start_mb": ("start", 0),
    "rss_quarter_mb": ("¼ drained", 0),
    "rss_peak_mb": ("peak", 0),
    "rss_end_mb": ("end", 0),
    "rss_mb": ("RSS MB", 0),
    "drained": ("drained", 0),
    "samples": ("samples", 0),
    "vs_no_drain": ("× no drain", 2),
    "lock_pct": ("% on locks", 0),
    "wal_pct": ("% on WAL", 0),
    "client_pct": ("% on producer", 0),
    "cpu_pct": ("% running", 0),
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


def _one(rows: Iterable[Row], scenario: str, **params: Any) -> Row | None:
    """The row of ``scenario`` whose params include ``params``."""
    found = _find(rows, scenario, lambda r: all(r.params.get(k) == v for k, v in params.items()))
    return found[0] if found else None


def _not_measured(name: str, goal: str, why: str) -> Target:
    return Target(name, goal, f"not measured: {why}", None)


def targets(rows: Sequence[Row], skipped: Mapping[str, str] | None = None) -> list[Target]:
    """The targets of issue 9 (the relay pipeline), from this run's rows. ``skipped`` says
    why a part was not run ("baseline", "sinks"); a target whose scenario was not run at all
    is left out."""
    skipped = skipped or {}
    scenarios = {r.scenario for r in rows}
    out: list[Target] = []
    if "alternatives" in scenarios:
        out += _drain_targets(rows, skipped.get("baseline", "no baseline row"))
    if "sinks" in scenarios or "sinks" in skipped:
        out.append(_sinks_target(rows, skipped.get("sinks", "no row at concurrency 64")))
        out.append(_limited_target(rows, skipped.get("sinks", "no nats row under --limits")))
        out.append(_kafka_target(rows, skipped.get("sinks", "no kafka row at concurrency 64")))
    if "alternatives" in scenarios:
        out.append(_latency_target(rows))
    if "email" in scenarios:
        out.append(_email_target(rows))
    if "producer-cost" in scenarios:
        out.append(_producer_cost_target(rows))
    if "idle" in scenarios:
        out.append(_idle_target(rows))
    if "ordering" in scenarios:
        out.append(_ordering_target(rows))
    return out


def _ordering_target(rows: Sequence[Row]) -> Target:
    keyed = [r for r in _find(rows, "ordering", lambda r: r.params.get("keys", 0) > 1)]
    drain = next((r for r in keyed if r.params["test"] == "drain"), None)
    name, goal = "ordering keys: drain", "≥ 0.7× the unordered drain, same round (issue 10)"
    if drain is None:
        return _not_measured(name, goal, "no keyed drain row")
    ratio = drain.median("vs_unordered")
    return Target(
        name,
        goal,
        f"{drain.median('intents_per_s'):,.0f}/s over {drain.params['keys']:,} keys = "
        f"{ratio:.2f}× unordered",
        ratio >= 0.7,
    )


def _drain_targets(rows: Sequence[Row], baseline_why: str) -> list[Target]:
    relay = _one(rows, "alternatives", test="drain", system="outbox-worker", baseline=False)
    old = _one(rows, "alternatives", test="drain", system="outbox-worker", baseline=True)
    pgq = _find(
        rows,
        "alternatives",
        lambda r: r.params.get("system") == "pgqueuer" and r.params.get("test") == "drain",
    )
    name, goal = "drain, concurrency 64", "≥ 3× pgqueuer's best batch size, same round"
    out = []
    if relay is None or not pgq:
        out.append(_not_measured(name, goal, "no relay or pgqueuer drain"))
    else:
        best = max(pgq, key=lambda r: r.median("intents_per_s"))
        ratio = relay.median("vs_pgqueuer_best")
        out.append(
            Target(
                name,
                goal,
                f"{relay.median('intents_per_s'):,.0f}/s = {ratio:.2f}× pgqueuer's best "
                f"(best median: {best.median('intents_per_s'):,.0f}/s, "
                f"{best.label.split(', ')[-1]})",
                ratio >= 3,
            )
        )
    name, goal = "worker CPU per no-op intent", "≤ 1/4 of the old relay's, same round"
    if relay is None or old is None:
        out.append(_not_measured(name, goal, baseline_why))
    else:
        ratio = relay.median("cpu_vs_baseline")
        out.append(
            Target(
                name,
                goal,
                f"{relay.median('worker_us_per_intent'):.0f} µs, "
                f"{relay.median('intents_per_s'):,.0f}/s; {old.label.split(' drain')[0]}: "
                f"{old.median('worker_us_per_intent'):.0f} µs, "
                f"{old.median('intents_per_s'):,.0f}/s; ratio {ratio:.2f}",
                ratio <= 0.25,
            )
        )
    return out


def _sinks_target(rows: Sequence[Row], why: str) -> Target:
    name, goal = "sinks through the relay at 64", "≥ 0.7× the sink alone (nats, rabbitmq, webhook)"
    found = {
        sink: _one(rows, "sinks", sink=sink, mode="relay", concurrency=64)
        for sink in ("nats", "rabbitmq", "webhook")
    }
    measured = {sink: row for sink, row in found.items() if row is not None}
    if not measured:
        return _not_measured(name, goal, why)
    ratios = {sink: row.median("vs_sink_alone") for sink, row in measured.items()}
    text = ", ".join(f"{sink} {ratio:.2f}×" for sink, ratio in ratios.items())
    missing = sorted(set(found) - set(measured))
    if missing:
        text += f" ({', '.join(missing)} not measured)"
    return Target(name, goal, text, all(r >= 0.7 for r in ratios.values()) and not missing)


def _limited_target(rows: Sequence[Row], why: str) -> Target:
    name = "nats under --limits nats:concurrency=64"
    goal = "within 10 % of nats without --limits, same round (issue 19)"
    row = _one(rows, "sinks", sink="nats", mode="limited", concurrency=64)
    if row is None:
        return _not_measured(name, goal, why)
    ratio = row.median("vs_relay")
    return Target(
        name,
        goal,
        f"{row.median('intents_per_s'):,.0f}/s = {ratio:.2f}× without",
        abs(ratio - 1) <= 0.1,
    )


def _kafka_target(rows: Sequence[Row], why: str) -> Target:
    name, goal = "kafka through the relay at 64", "≥ 0.8× the no-op relay drain, same round"
    row = _one(rows, "sinks", sink="kafka", mode="relay", concurrency=64)
    ratio = math.nan if row is None else row.median("vs_noop_relay")
    if row is None or math.isnan(ratio):
        return _not_measured(name, goal, why)
    text = f"{row.median('intents_per_s'):,.0f}/s = {ratio:.2f}× the no-op relay"
    return Target(name, goal, text, ratio >= 0.8)


def _latency_target(rows: Sequence[Row]) -> Target:
    mine = _one(rows, "alternatives", test="latency", system="outbox-worker")
    theirs = _one(rows, "alternatives", test="latency", system="pgqueuer")
    rate = mine.params["rate"] if mine else 1000
    name, goal = f"latency at {rate:,}/s", "p50 and p99 each ≤ 0.5× pgqueuer's, same round"
    if mine is None or theirs is None or math.isnan(mine.median("p50_vs_pgqueuer")):
        return _not_measured(name, goal, "no relay and pgqueuer latency rows of the same rounds")
    parts, met = [], True
    for p in ("p50", "p99"):
        ratio = mine.median(f"{p}_vs_pgqueuer")
        met = met and ratio <= 0.5
        parts.append(
            f"{p} {mine.median(f'{p}_ms'):.2f} ms = {ratio:.2f}× pgqueuer's "
            f"{theirs.median(f'{p}_ms'):.2f}"
        )
    return Target(name, goal, "; ".join(parts), met)


def _email_target(rows: Sequence[Row]) -> Target:
    name, goal = "email at concurrency 32", "pooled EmailSink ≥ 5× the connect-per-mail loop"
    tops = _find(
        rows, "email", lambda r: r.params.get("sink") == "email" and r.params["concurrency"] == 32
    )
    if not tops:
        return _not_measured(name, goal, "concurrency 32 not in this run")
    return Target(
        name,
        goal,
        "; ".join(
            f"{'STARTTLS' if r.params.get('starttls') else 'plain'} "
            f"{r.median('intents_per_s'):,.0f}/s = {r.median('vs_naive'):.1f}× naive"
            for r in tops
        ),
        all(r.median("vs_naive") >= 5 for r in tops),
    )


def _producer_cost_target(rows: Sequence[Row]) -> Target:
    counts = {
        r.params["producers"]
        for r in rows
        if r.scenario == "producer-cost" and "producers" in r.params
    }
    n = 16 if 16 in counts else max(counts)
    main_row = _one(rows, "producer-cost", variant="main", producers=n)
    assert main_row is not None
    ratio = main_row.median("vs_no_trigger")
    always = _one(rows, "producer-cost", variant="always", producers=n)
    extra = f"; always-notify: {always.median('vs_no_trigger'):.2f}×" if always else ""
    wake = _find(
        rows, "producer-cost", lambda r: r.params.get("variant") == "main" and "rate" in r.params
    )
    if wake:
        extra += (
            f"; wake-up at {wake[0].params['rate']}/s p50 {wake[0].median('wake_p50_ms'):.1f} ms"
        )
    return Target(
        f"producer cost at {n} producers",
        "≥ 0.9× the no-trigger commit rate (at 16), relay draining alongside",
        f"main's trigger: {ratio:.2f}× no trigger{extra}",
        ratio >= 0.9,
    )


def _idle_target(rows: Sequence[Row]) -> Target:
    idle = _one(rows, "idle", system="outbox-worker")
    name, goal = "idle", "≤ 1 claim query per poll interval per process"
    if idle is None:
        return _not_measured(name, goal, "no relay row")
    # The poll is jittered (it only lengthens the interval): no claim sooner than 0.8 poll
    # intervals after the previous one means every claim was the poll's own, none extra.
    poll = idle.params["poll"]
    shortest = min(r.get("shortest_gap_s", math.nan) for r in idle.runs)
    return Target(
        name,
        goal,
        f"{idle.median('claims_per_poll'):.2f} claims per poll interval; shortest "
        f"gap between claims {shortest:.2f} s (poll {poll:g} s, jittered)",
        shortest >= 0.8 * poll,
    )


TARGETS_TITLE = "Targets of issues 9 (relay pipeline) and 10 (ordering keys)"
_MET = {True: "yes", False: "NO", None: "–"}


def targets_table(found: Sequence[Target]) -> Table:
    table = Table(title=TARGETS_TITLE, title_justify="left")
    for column in ("target", "goal", "measured (median of runs)", "met"):
        table.add_column(column)
    for t in found:
        table.add_row(t.name, t.goal, t.measured, _MET[t.met])
    return table


def markdown_targets(found: Sequence[Target]) -> str:
    lines = [f"**{TARGETS_TITLE}**", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t.name} | {t.goal} | {t.measured} | {_MET[t.met]} |" for t in found]
    return "\n".join(lines)


# --- the machine -------------------------------------------------------------------------


def _load(values: Sequence[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) + " (1 / 5 / 15 min)" if values else "?"


def context_lines(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """What the figures were measured on, as (what, value) lines."""
    machine = meta.get("machine", {})
    pg = meta.get("postgresql", {})
    rate = machine.get("fdatasync_per_s")
    fsync = (
        f"{rate:,.0f} ops/s ({1000 / rate:.2f} ms per flush), pg_test_fsync -s 1 on "
        f"{machine.get('fdatasync_on')}"
        if rate
        else machine.get("fdatasync_on", "n/a")
    )
    versions = meta.get("versions", {})
    return [
        ("CPUs", f"{machine.get('cpus')} × {machine.get('cpu', '?')}"),
        ("load average at start", _load(machine.get("load_average_at_start"))),
        ("load average at end", _load(machine.get("load_average_at_end"))),
        ("fdatasync", fsync),
        (
            "PostgreSQL",
            f"{pg.get('version')}: fsync={pg.get('fsync')}, "
            f"synchronous_commit={pg.get('synchronous_commit')}, "
            f"shared_buffers={pg.get('shared_buffers')}, "
            f"wal_sync_method={pg.get('wal_sync_method')}",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("baseline", meta.get("baseline", "–")),
        ("size, runs", f"{meta.get('size')}, {meta.get('runs')} runs per figure"),
    ]


def context_table(meta: dict[str, Any]) -> Table:
    table = Table(title="Measured on", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for what, value in context_lines(meta):
        table.add_row(what, value)
    return table


def markdown_context(meta: dict[str, Any]) -> str:
    return "\n".join(f"- {what}: {value}" for what, value in context_lines(meta))


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
    meta: dict[str, Any],
) -> None:
    for title, metrics, rows in sections:
        if rows:
            console.print(scenario_table(title, metrics, rows))
    if found:
        console.print(targets_table(found))
    console.print(context_table(meta))
