"""`outbox-worker`: parsed arguments -> Settings -> run / migrate / schema / status / ..."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
import asyncpg
import orjson
from rich.console import Console

from worker import logs
from worker.cli import admin
from worker.cli.arguments import ONE_SHOT, parse_args
from worker.cli.options import Option, run_options
from worker.errors import ConfigError
from worker.eventloop import backend_options
from worker.settings import Settings, default_channel
from worker.store.db import connect
from worker.store.grants import (
    PRODUCER,
    WORKER,
    Privilege,
    grants_hint,
    grants_sql,
    privilege_error,
)
from worker.store.migrate import dry_run, ensure_schema, migrate
from worker.store.sqlfiles import Names, migration_sql


def _want_dashboard(args: argparse.Namespace) -> bool:
    if args.dashboard is not None:
        return bool(args.dashboard)
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def _from_env(opt: Option) -> Any:
    raw = os.environ.get(opt.env)
    if raw is None:
        return None
    try:
        if opt.repeat:  # one value a line
            return tuple(opt.convert(line.strip()) for line in raw.splitlines() if line.strip())
        value = opt.convert(raw)
    except ValueError as exc:
        raise ConfigError(f"{opt.env}: {exc}") from None
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
    sink_values: dict[str, Any] = {}  # the sinks' own, by name (worker/sinks/spec.py)
    for opt in run_options() if args.command == "run" else []:
        value = getattr(args, opt.field)
        if value is not None and opt.field == "listen":
            value = False
        if isinstance(value, list):  # a repeated flag's values
            value = tuple(value)
        if value is None:
            value = _from_env(opt)
        if value is not None:
            (sink_values if opt.sink else values)[opt.field] = value
    schema = _name_arg(args.schema, "OUTBOX_SCHEMA")
    schema = "outbox" if schema is None else schema
    channel = _name_arg(args.channel, "OUTBOX_CHANNEL")
    channel = default_channel(schema) if channel is None else channel
    dsn = getattr(args, "dsn", None) or os.environ.get("DATABASE_URL") or None
    return Settings(dsn=dsn, schema=schema, channel=channel, sink_options=sink_values, **values)


def _log_format(args: argparse.Namespace) -> str:
    fmt = getattr(args, "log_format", None) or os.environ.get("OUTBOX_LOG_FORMAT") or "text"
    if fmt not in ("text", "json"):
        raise ConfigError(f"OUTBOX_LOG_FORMAT: expected text or json, got {fmt!r}")
    return fmt


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """The configured database, or an embedded one on a machine that has none."""
    if dsn:
        yield dsn
        return
    from worker.cli.embedded import start_embedded

    logging.getLogger("outbox").info("no --dsn or DATABASE_URL: starting an embedded PostgreSQL")
    with start_embedded() as embedded:
        yield embedded.dsn


async def _with_conn(
    dsn: str,
    action: Callable[[Any], Any],
    schema: tuple[Names, bool] | None = None,
    needed: tuple[Privilege, ...] = WORKER,
) -> Any:
    """``action(conn)``; with ``schema`` (names, ours) the intent table is checked first,
    or brought up to date on a database of our own. A privilege it lacks is one line."""
    conn = await connect(dsn)
    try:
        if schema is not None:
            await ensure_schema(conn, schema[0], apply=schema[1], producer=needed is PRODUCER)
        try:
            return await action(conn)
        except asyncpg.InsufficientPrivilegeError as exc:
            if schema is None:
                raise
            line = await privilege_error(conn, schema[0].schema, needed, str(exc))
            raise ConfigError(line) from None
    finally:
        await conn.close()


def dispatch(args: argparse.Namespace, settings: Settings) -> int:
    names = Names(settings.schema, settings.channel)
    if args.command == "schema":
        print(migration_sql(names))
        return 0
    if args.command == "grants":
        if args.worker_role is None and args.producer_role is None:
            raise ConfigError("grants: give --worker-role ROLE, --producer-role ROLE, or both")
        print(grants_sql(settings.schema, args.worker_role, args.producer_role))
        return 0
    if args.command == "demo":
        return _demo(args)
    with database(settings.dsn) as dsn:
        if args.command == "run":
            from worker.cli.app import run_worker

            # An embedded database is ours: always bring its schema up to date.
            run_settings = settings if settings.dsn else replace(settings, migrate=True)
            anyio.run(
                partial(run_worker, run_settings, dsn, dashboard=_want_dashboard(args)),
                backend_options=backend_options(),
            )
        elif args.command == "migrate" and args.dry_run:
            print(anyio.run(_with_conn, dsn, lambda conn: dry_run(conn, names)))
        elif args.command == "migrate":
            migrated = anyio.run(_with_conn, dsn, lambda conn: migrate(conn, names))
            print(f"schema {names.schema} {migrated}")
        else:
            _operator_command(args, names, dsn, ours=not settings.dsn)
    return 0


def _operator_command(args: argparse.Namespace, names: Names, dsn: str, *, ours: bool) -> None:
    console = Console()

    def on_schema(action: Callable[[Any], Any]) -> Any:
        needed = PRODUCER if args.command == "enqueue" else WORKER
        return anyio.run(_with_conn, dsn, action, (names, ours), needed)

    if args.command == "status":
        report = on_schema(lambda conn: admin.status(conn, names))
        if args.json:
            print(orjson.dumps(report).decode())
        else:
            admin.print_status(report, console)
    elif args.command == "retry-dead":
        ids = on_schema(
            lambda conn: admin.retry_dead(
                conn, names, kind=args.kind, intent_id=args.id, key=args.key
            )
        )
        console.print(f"{len(ids)} dead intents back to pending")
    elif args.command == "skip-dead":
        skipped = on_schema(lambda conn: admin.skip_dead(conn, names, args.key))
        if skipped is None:
            raise ConfigError(f"ordering key {args.key!r} is not halted by a dead intent")
        console.print(f"intent {skipped} stays dead; key {args.key!r} moves on")
    elif args.command == "purge":
        statuses = sorted(set(args.status or ["sent"]))
        deleted = on_schema(lambda conn: admin.purge(conn, names, args.older_than, statuses))
        console.print(f"deleted {deleted} {'/'.join(statuses)} intents")
    elif args.command == "enqueue":
        new_id = on_schema(
            lambda conn: admin.enqueue(
                conn,
                names,
                args.kind,
                args.payload,  # parsed (and refused if it is not JSON) by the argument parser
                run_at=args.run_at,
                dedupe_key=args.dedupe_key,
                max_attempts=args.max_attempts,
                ordering_key=args.ordering_key,
            )
        )
        print(new_id)


def _demo(args: argparse.Namespace) -> int:
    from worker.cli.demo import DEMO_SCHEMA, DemoOptions, check_schema, run_demo

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
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:  # a sink plugin that cannot be loaded, or clashes
        print(f"outbox-worker: error: {exc}", file=sys.stderr)
        return 2
    try:
        # Run and demo tell what they are doing; a one-shot command prints its result and
        # logs only what went wrong (the embedded server's start-up is no news there).
        level = logging.INFO if args.command not in ONE_SHOT else logging.WARNING
        logs.setup(_log_format(args), logging.DEBUG if getattr(args, "verbose", False) else level)
        settings = settings_from(args)
        return dispatch(args, settings)
    except ConfigError as exc:
        print(f"outbox-worker: error: {logs.redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A grant revoked while `run` runs (checked at start-up, refused since): one line
        # and exit 2, like every other privilege error, not a traceback from a task group.
        denied = _denied(exc)
        if denied is None:
            raise
        hint = grants_hint(getattr(args, "schema", None) or "outbox")
        print(f"outbox-worker: error: {denied}: {hint}", file=sys.stderr)
        return 2


def _denied(exc: BaseException) -> asyncpg.InsufficientPrivilegeError | None:
    """The privilege error behind ``exc``, if that is what it is (within exception groups)."""
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _denied(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
