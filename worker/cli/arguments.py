"""The `outbox-worker` command line: its commands and flags, a help that shows the worker's
flags up front, and errors in one line (argparse would print its usage block first)."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any, NoReturn

import orjson

from worker.cli.options import (
    duration,
    expecting,
    non_negative_float,
    positive_float,
    positive_int,
    retention,
    run_options,
    show_retention,
)
from worker.settings import Settings

PROG = "outbox-worker"
COMMANDS = (
    "run",
    "migrate",
    "schema",
    "grants",
    "status",
    "retry-dead",
    "skip-dead",
    "purge",
    "enqueue",
    "demo",
)
ONE_SHOT = frozenset(COMMANDS) - {"run", "demo"}  # log warnings only, unless -v
_DEFAULTS = {f.name: f.default for f in fields(Settings)}

json_value = expecting("JSON")(orjson.loads)
iso_time = expecting("an ISO 8601 time such as 2026-12-24T18:00:00+01:00")(datetime.fromisoformat)


class Parser(argparse.ArgumentParser):
    commands: dict[str, Parser]  # the top-level parser's subcommands

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)" if "arguments are required" in message else ""
        self.exit(2, f"{PROG}: error: {message.removeprefix('argument ')}{hint}\n")


# Both a parser and an argument group: the top-level help shows the run flags in a group.
_Container = argparse._ActionsContainer


def _add_common(parser: _Container) -> None:
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
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (else: info for run "
        "and demo, warnings only for the one-shot commands)",
    )  # fmt: skip


def _add_dashboard_flag(parser: _Container) -> None:
    parser.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live terminal dashboard instead of log lines [default: on when stdout is a terminal]",
    )


def _add_run_options(parser: _Container) -> None:
    _add_common(parser)
    for opt in run_options():
        default = opt.default if opt.sink else _DEFAULTS[opt.field]
        shown = (
            ""
            if opt.switch or default in (None, "", ())
            else f"; default: {_SHOWN.get(opt.convert, str)(default)}"
        )
        help = f"{opt.help} [env: {opt.env}{shown}]"
        if opt.switch:
            parser.add_argument(
                opt.flag, dest=opt.field, action="store_const", const=True, default=None, help=help
            )
        else:
            metavar = _METAVARS.get(opt.convert, opt.field.upper())
            action = "append" if opt.repeat else "store"
            parser.add_argument(
                opt.flag, dest=opt.field, type=opt.convert, default=None, metavar=metavar,
                action=action, help=help,
            )  # fmt: skip
    _add_dashboard_flag(parser)


_METAVARS = {
    positive_int: "N",
    positive_float: "SECONDS",
    non_negative_float: "SECONDS",
    retention: "DURATION",
}
# How a default reads in the help: 2 (seconds), not 2.0.
_SHOWN: dict[Callable[[str], Any], Callable[[Any], str]] = {
    retention: show_retention,
    positive_float: "{:g}".format,
    non_negative_float: "{:g}".format,
}


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


_WORKER_OPTIONS = "worker options (run, the default command; each has an environment variable)"


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        usage=f"{PROG} [run] [options]\n       {PROG} COMMAND [options]",
        description="Transactional-outbox relay for PostgreSQL. With no command, runs the "
        "worker: its options are listed below.",
        epilog=f"`{PROG} COMMAND --help` lists the options of the other commands.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", prog=PROG)
    # Listed in the top-level help only: parse_args always hands them to `run`.
    _add_run_options(parser.add_argument_group(_WORKER_OPTIONS))
    run = sub.add_parser(
        "run", help="deliver intents (the default command)", usage=f"{PROG} [run] [options]"
    )
    _add_run_options(run.add_argument_group(_WORKER_OPTIONS))
    _add_demo(sub)
    migrate = sub.add_parser("migrate", help="apply the schema migrations not applied yet")
    _add_common(migrate)
    migrate.add_argument(
        "--dry-run", action="store_true", help="print the SQL it would run; change nothing"
    )
    schema = sub.add_parser("schema", help="print the schema SQL for your own migration tool")
    schema.add_argument(
        "--schema", help="schema the SQL creates [env: OUTBOX_SCHEMA; default: outbox]"
    )
    schema.add_argument(
        "--channel",
        help="NOTIFY channel of its trigger [env: OUTBOX_CHANNEL; default: SCHEMA_intent]",
    )
    grants = sub.add_parser(
        "grants", help="print the GRANT statements for a worker role and a producer role"
    )
    grants.add_argument("--worker-role", help="the role the worker logs in as")
    grants.add_argument("--producer-role", help="the role producers log in as")
    grants.add_argument(
        "--schema", help="schema the grants are on [env: OUTBOX_SCHEMA; default: outbox]"
    )
    grants.set_defaults(channel=None)
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
    enq.add_argument("kind", help="the sink or handler that delivers it")
    # Parsed here, so a bad payload is refused before any database is started.
    enq.add_argument("payload", type=json_value, help="the payload as JSON")
    enq.add_argument("--run-at", type=iso_time, help="ISO 8601 time, not before")
    enq.add_argument("--dedupe-key", help="a second enqueue with this key inserts nothing")
    enq.add_argument(
        "--max-attempts", type=positive_int, help="attempts before it is dead [default: the "
        "worker's --max-attempts]"
    )  # fmt: skip
    enq.add_argument("--ordering-key", help="delivered after the key's earlier intents")
    parser.commands = dict(sub.choices)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    implicit_run = not argv or argv[0] not in (*COMMANDS, "-h", "--help")
    if implicit_run:
        argv.insert(0, "run")  # `outbox-worker --concurrency 8` means `run`
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unrecognized(parser.commands, args.command, unknown, implicit_run))
    return args


def _unrecognized(
    commands: dict[str, Parser], command: str, unknown: list[str], implicit: bool
) -> str:
    """What is wrong with the first unknown word, and the closest thing that would be right."""
    parser = commands[command]
    misplaced = [word for word in unknown if word in commands]
    if misplaced:  # `outbox-worker --json status`
        return f"{misplaced[0]!r} is a command and comes first: {PROG} {misplaced[0]} [options]"
    word = unknown[0]
    if not word.startswith("-"):
        close = difflib.get_close_matches(word, COMMANDS, n=1)
        if close:
            return f"unknown command {word!r}; did you mean {close[0]}?"
        if implicit:
            return f"unknown command {word!r}; the commands are {', '.join(COMMANDS)}"
        return f"unexpected argument {word!r} (see `{parser.prog} --help`)"
    flag = word.partition("=")[0]
    owners = [name for name, other in commands.items() if flag in _flags(other)]
    if owners:
        return f"{flag} is a flag of {' and '.join(owners)}, not of {command}"
    # Compared without the dashes, which every flag shares.
    names = {f.lstrip("-"): f for f in _flags(parser)}
    close = difflib.get_close_matches(flag.lstrip("-"), names, n=1)
    if close:
        return f"unknown flag {flag}; did you mean {names[close[0]]}?"
    return f"unknown flag {flag} (`{parser.prog} --help` lists the flags)"


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    # argparse offers no public list of a parser's flags; _actions is stable since 2.7.
    return [flag for action in parser._actions for flag in action.option_strings]
