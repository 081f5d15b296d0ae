"""`outbox-worker`: argument parsing -> Settings -> run / migrate / schema / status / ..."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import orjson
from rich.console import Console

from worker import admin, logs
from worker.db import connect
from worker.errors import ConfigError
from worker.eventloop import backend_options
from worker.migrate import migrate
from worker.options import RUN_OPTIONS, Option, duration, positive_float, positive_int
from worker.settings import Settings, default_channel
from worker.sqlfiles import Names, migration_sql

COMMANDS = (
    "run",
    "migrate",
    "schema",
    "status",
    "retry-dead",
    "skip-dead",
    "purge",
    "enqueue",
    "demo",
)
_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        help="PostgreSQL URL [env: DATABASE_URL; default: an embedded "
        "PostgreSQL in a per-user data directory]",
    )
    parser.add_argument(
        "--schema", help="schema holding the intent table [env: OUTBOX_SCHEMA; default: outbox]"
    )
    parser.add_argument(
        "--channel", help="NOTIFY channel [env: OUTBOX_CHANNEL; default: SCHEMA_intent]"
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or JSON [env: OUTBOX_LOG_FORMAT; default: text]",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_dashboard_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live terminal dashboard instead of log lines [default: on when stdout is a terminal]",
    )


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="see the relay at work: embedded PostgreSQL, in-process SMTP, sample intents",
    )
    demo.add_argument(
        "--dsn", help="use this PostgreSQL instead of an embedded one (schema outbox_demo)"
    )
    demo.add_argument(
        "--schema", help="schema to use (emptied at start; must start with outbox_demo)"
    )
    demo.add_argument("--concurrency", type=positive_int, default=8, help="delivery slots")
    demo.add_argument(
        "--rate", type=positive_float, default=20.0, help="sample intents per second, on average"
    )
    demo.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    demo.add_argument(
        "--log-format", choices=("text", "json"), help="log lines as text or JSON (no dashboard)"
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    demo.set_defaults(channel=None)  # always the schema's default channel
    _add_dashboard_flag(demo)


def _want_dashboard(args: argparse.Namespace) -> bool:
    if args.dashboard is not None:
        return bool(args.dashboard)
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-worker",
        description="Transactional-outbox relay for PostgreSQL. With no command, runs the worker.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="deliver intents (the default command)")
    _add_common(run)
    for opt in RUN_OPTIONS:
        env_help = (
            f"[env: {opt.env}]"
            if opt.switch
            else f"[env: {opt.env}; default: {_DEFAULTS[opt.field]}]"
        )
        if opt.switch:
            run.add_argument(
                opt.flag,
                dest=opt.field,
                action="store_const",
                const=True,
                default=None,
                help=f"{opt.help} {env_help}",
            )
        else:
            run.add_argument(
                opt.flag,
                dest=opt.field,
                type=opt.convert,
                default=None,
                metavar=opt.field.upper(),
                help=f"{opt.help} {env_help}",
            )
    _add_dashboard_flag(run)
    _add_demo(sub)
    _add_common(sub.add_parser("migrate", help="create or update the schema (idempotent)"))
    schema = sub.add_parser("schema", help="print the schema SQL for your own migration tool")
    schema.add_argument("--schema")
    schema.add_argument("--channel")
    status = sub.add_parser("status", help="counts by kind and status, oldest pending, dead")
    _add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    retry = sub.add_parser("retry-dead", help="send dead intents back to pending")
    _add_common(retry)
    retry.add_argument("--kind", help="only this kind")
    retry.add_argument("--id", type=positive_int, help="only this intent")
    retry.add_argument("--key", help="only this ordering key (its dead head runs again first)")
    skip = sub.add_parser(
        "skip-dead",
        help="let an ordering key halted by a dead intent move on (the intent stays dead)",
    )
    _add_common(skip)
    skip.add_argument("key", help="the ordering key")
    purge = sub.add_parser("purge", help="delete finished intents older than a given age")
    _add_common(purge)
    purge.add_argument(
        "--older-than", type=duration, required=True, metavar="AGE",
        help="finished (sent, or created for dead ones) longer ago than this: 30d, 12h, 90m, 600s",
    )  # fmt: skip
    purge.add_argument(
        "--status", action="append", choices=("sent", "dead"),
        help="which finished intents (repeatable; default: sent only, dead ones are evidence)",
    )  # fmt: skip
    enq = sub.add_parser("enqueue", help="insert an intent (for trying things out)")
    _add_common(enq)
    enq.add_argument("kind")
    enq.add_argument("payload", help="the payload as JSON")
    enq.add_argument("--run-at", type=datetime.fromisoformat, help="ISO 8601 time, not before")
    enq.add_argument("--dedupe-key")
    enq.add_argument("--max-attempts", type=positive_int)
    enq.add_argument("--ordering-key", help="delivered after the key's earlier intents")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if not any(a in ("-h", "--help") for a in argv[:1]) and first not in COMMANDS:
        argv.insert(0, "run")  # `outbox-worker --concurrency 8` means `run`
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def _from_env(parser: argparse.ArgumentParser, opt: Option) -> Any:
    raw = os.environ.get(opt.env)
    if raw is None:
        return None
    try:
        value = opt.convert(raw)
    except ValueError:
        parser.error(f"{opt.env}={raw!r}: expected a {opt.convert.__name__}")
    if opt.field == "listen":  # OUTBOX_NO_LISTEN=1 means listen=False
        return not value
    return value


def _name_arg(value: Any, env: str) -> str | None:
    """An explicit --schema/--channel, even an empty one (refused later, not replaced by
    the default); else the environment variable, unless unset or empty."""
    if value is not None:
        return value if isinstance(value, str) else ""  # argparse makes "--schema=--" []
    return os.environ.get(env) or None


def settings_from(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {}
    for opt in RUN_OPTIONS if args.command == "run" else []:
        value = getattr(args, opt.field)
        if value is not None and opt.field == "listen":
            value = False
        if value is None:
            value = _from_env(args.parser, opt)
        if value is not None:
            values[opt.field] = value
    schema = _name_arg(args.schema, "OUTBOX_SCHEMA")
    schema = "outbox" if schema is None else schema
    channel = _name_arg(args.channel, "OUTBOX_CHANNEL")
    channel = default_channel(schema) if channel is None else channel
    dsn = getattr(args, "dsn", None) or os.environ.get("DATABASE_URL") or None
    return Settings(dsn=dsn, schema=schema, channel=channel, **values)


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """The configured database, or an embedded one on a machine that has none."""
    if dsn:
        yield dsn
        return
    from worker.embedded import start_embedded

    logging.getLogger("outbox").info("no --dsn or DATABASE_URL: starting an embedded PostgreSQL")
    with start_embedded() as embedded:
        logging.getLogger("outbox").info("embedded PostgreSQL ready: %s", embedded.dsn)
        yield embedded.dsn


async def _with_conn(dsn: str, action: Callable[[Any], Any]) -> Any:
    conn = await connect(dsn)
    try:
        return await action(conn)
    finally:
        await conn.close()


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    names = Names(settings.schema, settings.channel)
    console = Console()
    if args.command == "schema":
        print(migration_sql(names))
        return 0
    logs.register_secret_url(settings.dsn)
    logs.register_secret_url(settings.smtp_url)
    logs.register_secret_url(settings.rabbitmq_url)
    logs.register_secret_url(settings.celery_broker_url)
    for nats_server in (settings.nats_url or "").split(","):
        logs.register_secret_url(nats_server.strip())
    if args.command == "demo":
        return _demo(args)
    with database(settings.dsn) as dsn:
        if args.command == "run":
            from dataclasses import replace

            from worker.app import run_worker

            # An embedded database is ours: always bring its schema up to date.
            run_settings = settings if settings.dsn else replace(settings, migrate=True)
            anyio.run(
                partial(run_worker, run_settings, dsn, dashboard=_want_dashboard(args)),
                backend_options=backend_options(),
            )
        elif args.command == "migrate":
            anyio.run(_with_conn, dsn, lambda conn: migrate(conn, names))
        elif args.command == "status":
            report = anyio.run(_with_conn, dsn, lambda conn: admin.status(conn, names))
            if args.json:
                print(orjson.dumps(report).decode())
            else:
                admin.print_status(report, console)
        elif args.command == "retry-dead":
            ids = anyio.run(
                _with_conn,
                dsn,
                lambda conn: admin.retry_dead(
                    conn, names, kind=args.kind, intent_id=args.id, key=args.key
                ),
            )
            console.print(f"{len(ids)} dead intents back to pending")
        elif args.command == "skip-dead":
            skipped = anyio.run(
                _with_conn, dsn, lambda conn: admin.skip_dead(conn, names, args.key)
            )
            if skipped is None:
                raise ConfigError(f"ordering key {args.key!r} is not halted by a dead intent")
            console.print(f"intent {skipped} stays dead; key {args.key!r} moves on")
        elif args.command == "purge":
            statuses = sorted(set(args.status or ["sent"]))
            deleted = anyio.run(
                _with_conn, dsn, lambda conn: admin.purge(conn, names, args.older_than, statuses)
            )
            console.print(f"deleted {deleted} {'/'.join(statuses)} intents")
        elif args.command == "enqueue":
            try:
                payload = orjson.loads(args.payload)
            except orjson.JSONDecodeError as exc:
                raise ConfigError(f"payload is not valid JSON: {exc}") from None
            new_id = anyio.run(
                _with_conn,
                dsn,
                lambda conn: admin.enqueue(
                    conn,
                    names,
                    args.kind,
                    payload,
                    run_at=args.run_at,
                    dedupe_key=args.dedupe_key,
                    max_attempts=args.max_attempts,
                    ordering_key=args.ordering_key,
                ),
            )
            print(new_id)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import DEMO_SCHEMA, DemoOptions, check_schema, run_demo

    # Only an explicit --dsn: DATABASE_URL names the user's real database.
    logs.register_secret_url(args.dsn)
    options = DemoOptions(
        concurrency=args.concurrency,
        rate=args.rate,
        duration=args.duration,
        dashboard=_want_dashboard(args),
        schema=check_schema(args.schema or DEMO_SCHEMA),
    )
    with database(args.dsn) as dsn:
        result = anyio.run(run_demo, dsn, options, backend_options=backend_options())
    where = f" --schema {options.schema}" + (" --dsn ..." if args.dsn else "")
    print(
        f"demo: {result.enqueued} intents committed; the in-process SMTP server caught "
        f"{result.caught} mails and refused {result.refused} on purpose.\n"
        f"Look at what is left: outbox-worker status{where}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args.parser.print_help()
        return 2
    log_format = getattr(args, "log_format", None) or os.environ.get("OUTBOX_LOG_FORMAT", "text")
    logs.setup(log_format, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        settings = settings_from(args)
        return dispatch(args, settings)
    except ConfigError as exc:
        print(f"outbox-worker: error: {logs.scrub(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
