"""``python -m bench [SCENARIO ...]``: run the benchmarks, print the tables, write the files.

    python -m bench                      # every scenario, full size, 3 runs each
    python -m bench drain latency        # some of them
    python -m bench --size tiny --runs 1 # a quick check that everything works
    python -m bench alternatives --baseline af30941   # the old relay's CPU per intent too

Against --dsn, else DATABASE_URL, else the local server at 127.0.0.1:5432, else an embedded
PostgreSQL. Writes RESULTS/results.json (raw per-run figures), RESULTS/latency-cdf.png and
the worker logs; prints one table per scenario, the targets of issue 9 (the relay pipeline)
and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import orjson
from rich.console import Console

from bench import baseline, report, sinks
from bench.context import SIZES, Context
from bench.figures import Row
from bench.machine import at_start
from bench.scenarios import SCENARIOS
from bench.server import server_info
from worker.cli.embedded import any_database
from worker.eventloop import backend_options
from worker.logs import redact_url

_REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all): {', '.join(SCENARIOS)} "
        "('sinks' needs RabbitMQ and NATS; skipped, saying why, without them)",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median, min–max)")
    parser.add_argument("--dsn", help="PostgreSQL URL (default: DATABASE_URL, local, embedded)")
    parser.add_argument(
        "--out",
        type=Path,
        default=_REPO / "bench" / "results",
        help="where results.json, latency-cdf.png and the worker logs go",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="the old relay whose worker CPU per intent the alternatives scenario compares "
        f"with, run from a git worktree of REV (default: {baseline.DEFAULT_REV} at full size, "
        "none at tiny size; 'none': skip it)",
    )
    parser.add_argument("--rabbitmq-url", default=sinks.URLS["rabbitmq"], help="for 'sinks'")
    parser.add_argument("--nats-url", default=sinks.URLS["nats"], help="for 'sinks' (JetStream)")
    parser.add_argument("--redis-url", default=sinks.URLS["redis"], help="for 'sinks' (job queues)")
    parser.add_argument(
        "--limited",
        default="nats",
        metavar="KIND[,KIND]",
        help="for 'sinks': kinds also run through the relay under --limits KIND:concurrency=C, "
        "C the relay's slots (default: nats; 'none': none)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print markdown tables")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="RESULTS",
        help="no benchmark: print the tables and targets of an earlier results.json, re-plot",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.limited = tuple(k for k in args.limited.split(",") if k.strip() not in ("", "none"))
    if set(args.limited) - set(sinks.SINKS):
        parser.error(f"--limited: choose from {', '.join(sinks.SINKS)}")
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return args


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("asyncpg", "anyio", "aiosmtplib", "pgqueuer", "procrastinate", "psycopg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        found["outbox-worker"] = rev
    except (OSError, subprocess.CalledProcessError):
        found["outbox-worker"] = metadata.version("pg-outbox-relay")
    return found


async def run_scenarios(ctx: Context, names: list[str]) -> list[tuple[str, list[Row]]]:
    done = []
    for name in names:
        module = SCENARIOS[name]
        done.append((name, await module.run(ctx)))
    return done


def _load_rows(path: Path) -> tuple[dict[str, Any], list[Row]]:
    document = orjson.loads(path.read_bytes())
    rows = [
        Row(
            r["scenario"],
            r["label"],
            r["params"],
            r["runs"],
            [value for value, _fraction in r.get("latency_cdf_ms", [])],
            r["notes"],
        )
        for r in document["rows"]
    ]
    return document["meta"], rows


def _sections(rows: list[Row]) -> list[tuple[str, Any, list[Row]]]:
    """(title, metrics, rows) per table: one per scenario, or its ``TABLES`` (title, metrics,
    the rows' params["test"])."""
    out = []
    for name, module in SCENARIOS.items():
        mine = [r for r in rows if r.scenario == name]
        tables = getattr(module, "TABLES", [(module.TITLE, module.METRICS, None)])
        for title, metrics, test in tables:
            part = [r for r in mine if test is None or r.params.get("test") == test]
            if part:
                out.append((title, metrics, part))
    return out


def _print_markdown(
    sections: list[tuple[str, Any, list[Row]]], found: list[report.Target], meta: dict[str, Any]
) -> None:
    for title, metrics, rows in sections:
        print(f"\n**{title}**\n\n{report.markdown_table(metrics, rows)}")
    print(f"\n{report.markdown_targets(found)}\n\n{report.markdown_context(meta)}")


def _subtitle(meta: dict[str, Any]) -> str:
    info = meta["postgresql"]
    return f"PostgreSQL {info['version']}, fsync={info['fsync']}, {meta['machine']['cpus']} CPUs"


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 150)


def _replay(args: argparse.Namespace) -> int:
    """--from-json: the tables, targets and context of an earlier run; the plot again."""
    meta, rows = _load_rows(args.from_json)
    sections = _sections(rows)
    found = report.targets(rows, meta.get("skipped"))
    report.print_all(_console(), sections, found, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    report.plot_cdfs(args.out / "latency-cdf.png", rows, _subtitle(meta))
    if args.markdown:
        _print_markdown(sections, found, meta)
    return 0


def _baseline(
    args: argparse.Namespace, names: list[str], console: Console
) -> tuple[baseline.BaselineRelaySystem | None, str]:
    """The old relay for the alternatives and tracing scenarios: (system or None, one line
    about it). Raises ``baseline.Unavailable`` at full size when it cannot be run."""
    if not {"alternatives", "tracing"} & set(names):
        return None, "baseline: not needed (no alternatives or tracing scenario)"
    system, line = baseline.resolve(args.baseline, tiny=args.size == "tiny")
    console.log(line)
    return system, line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return _replay(args)
    names = args.scenarios or list(SCENARIOS)
    console = _console()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        old_relay, baseline_line = _baseline(args, names, console)
    except baseline.Unavailable as exc:
        console.print(f"[red]{exc}[/red]\n(--baseline REV for another commit, none to skip it)")
        return 2
    started = time.monotonic()
    with any_database(args.dsn) as dsn:
        info = anyio.run(server_info, dsn)
        console.log(f"PostgreSQL {info['version']} at {redact_url(dsn)}: {info}")
        machine = at_start(info["data_directory"])  # the load average before we add to it
        console.log(f"machine: {machine}")
        ctx = Context(
            dsn=dsn,
            size=SIZES[args.size],
            runs=args.runs,
            log_dir=out / "logs",
            progress=lambda msg: console.log(msg),
            baseline=old_relay,
            broker_urls={
                "rabbitmq": args.rabbitmq_url,
                "nats": args.nats_url,
                "redis": args.redis_url,
            },
            limited_sinks=args.limited,
        )
        if old_relay is None:
            ctx.skipped["baseline"] = baseline_line
        # The loop `outbox-worker run` uses: the sinks scenario runs a relay in this process.
        results = anyio.run(run_scenarios, ctx, names, backend_options=backend_options())
    all_rows = [row for _name, rows in results for row in rows]
    meta = {
        "command": "python -m bench "
        + " ".join(map(redact_url, argv if argv is not None else sys.argv[1:])),  # --*-url
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "size": args.size,
        "runs": args.runs,
        "postgresql": info,
        "versions": _versions(),
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "baseline": baseline_line,
        "skipped": ctx.skipped,
        "workers": "one subprocess per worker (python -m bench.child); producers in the runner",
    }
    found = report.targets(all_rows, ctx.skipped)
    sections = _sections(all_rows)
    report.print_all(console, sections, found, meta)
    report.write_json(out / "results.json", meta, all_rows, found)
    if report.plot_cdfs(out / "latency-cdf.png", all_rows, _subtitle(meta)):
        console.log(f"plot: {out / 'latency-cdf.png'}")
    console.log(f"raw figures: {out / 'results.json'}")
    if args.markdown:
        _print_markdown(sections, found, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
