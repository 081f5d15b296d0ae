"""``python -m bench [SCENARIO ...]``: run the benchmarks, print the tables, write the files.

    python -m bench                      # every scenario, full size, 3 runs each
    python -m bench drain latency        # some of them
    python -m bench --size tiny --runs 1 # a quick check that everything works
    python -m bench sinks                # also the broker/webhook sinks (python -m bench.sinks)

Against --dsn, else DATABASE_URL, else the local server at 127.0.0.1:5432, else an embedded
PostgreSQL. Writes RESULTS/results.json (raw per-run figures), RESULTS/latency-cdf.png and
the worker logs; prints one table per scenario and the targets of issue 4.
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

from bench import report
from bench.context import SIZES, Context
from bench.figures import Row
from bench.scenarios import SCENARIOS
from bench.server import server_info
from worker.embedded import any_database
from worker.logs import redact_url

_REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"which to run (default: all): {', '.join(SCENARIOS)}; "
        "'sinks' (bench/sinks.py, needs RabbitMQ and NATS) only when named",
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
    unknown = [s for s in args.scenarios if s not in SCENARIOS and s != "sinks"]
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
        found["outbox-worker"] = metadata.version("outbox-worker")
    return found


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "load_average_at_start": os.getloadavg()}


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
    return [
        (module.TITLE, module.METRICS, [r for r in rows if r.scenario == name])
        for name, module in SCENARIOS.items()
        if any(r.scenario == name for r in rows)
    ]


def _print_markdown(sections: list[tuple[str, Any, list[Row]]]) -> None:
    for title, metrics, rows in sections:
        print(f"\n**{title}**\n\n{report.markdown_table(metrics, rows)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        meta, rows = _load_rows(args.from_json)
        sections = _sections(rows)
        console = Console(width=None if sys.stdout.isatty() else 150)
        report.print_all(console, sections, report.targets(rows))
        args.out.mkdir(parents=True, exist_ok=True)
        info = meta["postgresql"]
        subtitle = (
            f"PostgreSQL {info['version']}, fsync={info['fsync']}, {meta['machine']['cpus']} CPUs"
        )
        report.plot_cdfs(args.out / "latency-cdf.png", rows, subtitle)
        if args.markdown:
            _print_markdown(sections)
        return 0
    names = [s for s in args.scenarios if s != "sinks"] or (
        [] if args.scenarios else list(SCENARIOS)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if "sinks" in args.scenarios:
        # The broker and webhook sinks have their own runner (it needs RabbitMQ and NATS),
        # so they run only when asked for.
        from bench import sinks

        sink_args = ["--runs", str(args.runs)] + (
            ["--intents", "200"] if args.size == "tiny" else []
        )
        if args.dsn:
            sink_args += ["--dsn", args.dsn]
        sinks.main([*sink_args, "--json", str(args.out / "sinks.json")])
        if not names:
            return 0
    console = Console(width=None if sys.stdout.isatty() else 150)
    out: Path = args.out
    started = time.monotonic()
    machine = _machine()  # the load average now, before we add to it
    with any_database(args.dsn) as dsn:
        ctx = Context(
            dsn=dsn,
            size=SIZES[args.size],
            runs=args.runs,
            log_dir=out / "logs",
            progress=lambda msg: console.log(msg),
        )
        info = anyio.run(server_info, dsn)
        console.log(f"PostgreSQL {info['version']} at {redact_url(dsn)}: {info}")
        results = anyio.run(run_scenarios, ctx, names)
    all_rows = [row for _name, rows in results for row in rows]
    found = report.targets(all_rows)
    sections = _sections(all_rows)
    report.print_all(console, sections, found)
    meta = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "size": args.size,
        "runs": args.runs,
        "postgresql": info,
        "versions": _versions(),
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "workers": "one subprocess per worker (python -m bench.child); producers in the runner",
    }
    report.write_json(out / "results.json", meta, all_rows, found)
    subtitle = f"PostgreSQL {info['version']}, fsync={info['fsync']}, {os.cpu_count()} CPUs"
    if report.plot_cdfs(out / "latency-cdf.png", all_rows, subtitle):
        console.log(f"plot: {out / 'latency-cdf.png'}")
    console.log(f"raw figures: {out / 'results.json'}")
    if args.markdown:
        _print_markdown(sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
