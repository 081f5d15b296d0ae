"""docs/reference/cli.md from the argument parser itself (worker/cli/arguments.py): every
command, every flag with its variable, default and help, as `--help` shows them. Built-in
sinks only: a plugin installed where the page is generated would otherwise add its flags."""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tests.docs_reference.markdown import code, page, prose, table
from worker.cli.arguments import PROG, build_parser
from worker.cli.options import run_options
from worker.distribution import NAME
from worker.sinks.registry import builtin_specs
from worker.sinks.spec import SinkSpec

# The variable and default every help text of the worker ends with: "... [env: X; default: Y]".
_BRACKET = re.compile(
    r"\s*\[(?:env: (?P<env>[A-Z][A-Z0-9_]*))?(?:; )?(?:default: (?P<default>[^\]]*))?\]$"
)
_HEADERS = ("flag", "env", "default", "meaning")
_USAGE_WIDTH = 100


@dataclass(frozen=True)
class Flag:
    names: str  # as the reader types it: "--concurrency N", "-v, --verbose", "KEY"
    env: str
    default: str
    meaning: str

    def row(self) -> tuple[str, str, str, str]:
        return (code(self.names), code(self.env) if self.env else "", self.default, self.meaning)


def _flag(action: argparse.Action) -> Flag:
    meaning = (action.help or "").replace("%%", "%")
    env = default = ""
    found = _BRACKET.search(meaning)
    if found:
        meaning = meaning[: found.start()]
        env, default = found["env"] or "", found["default"] or ""
    switch = action.nargs == 0
    if switch:
        env = f"{env}=1" if env else ""
        default = default or "off"
    elif not default and action.default not in (None, argparse.SUPPRESS):
        default = str(action.default)
    metavar = action.metavar or action.dest.upper()
    if action.choices is not None and not switch:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"  # as --help shows it
    if action.option_strings:
        value = "" if switch else f" {metavar}"
        names = ", ".join(f"{flag}{value}" for flag in action.option_strings)
    else:
        names = str(metavar).upper()
    extras = []
    if isinstance(action, argparse._AppendAction) and "repeatable" not in meaning:
        extras.append("repeatable" + (", the variable one a line" if env else ""))
    if action.required and action.option_strings:
        extras.append("required")
    return Flag(names, env, prose(default), _sentence(prose(meaning), *extras))


def _sentence(text: str, *extras: str) -> str:
    """Help text as the start of a sentence, with any notes after it."""
    text += "".join(f"; {extra}" for extra in extras)
    return text[:1].upper() + text[1:]


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage lines of `--help`, at a fixed width (not the terminal's), without "usage: "."""
    formatter = argparse.HelpFormatter(parser.prog, width=_USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    prefix = "usage: "
    first, *rest = formatter.format_help().strip("\n").splitlines()
    return "\n".join([first.removeprefix(prefix), *(line[len(prefix) :] for line in rest)])


def _key(action: argparse.Action) -> tuple[tuple[str, ...], str | None]:
    return tuple(action.option_strings), action.help


def _shared(commands: dict[str, argparse.ArgumentParser]) -> tuple[list[str], set[object]]:
    """The commands that take the database flags (run's --dsn, as it is), and the flags they
    all have alike."""
    dsn = next(_key(a) for a in _actions(commands["run"]) if "--dsn" in a.option_strings)
    users = [n for n, p in commands.items() if dsn in {_key(a) for a in _actions(p)}]
    common = set.intersection(*({_key(a) for a in _actions(commands[n])} for n in users))
    return users, common


def _sink_section(spec: SinkSpec, by_flag: dict[str, argparse.Action]) -> str:
    kinds = ", ".join(code(kind) for kind in spec.kinds)
    links = ", ".join(f"[{kind}](../kinds/{kind}.md)" for kind in spec.kinds)
    install = f"pip install '{NAME}[{spec.extra}]'"
    needs = f"It needs the `{spec.extra}` extra: {code(install)}." if spec.extra else ""
    if spec.always_on or not spec.options:
        on = "It is on without any of these flags."
    else:
        first = _flag(by_flag[spec.options[0].flag])
        on = f"It is off until you set `{spec.options[0].flag}` or `{first.env}`."
    rows = [_flag(by_flag[option.flag]).row() for option in spec.options]
    intro = " ".join(part for part in (needs, on, f"More in {links}.") if part)
    return "\n\n".join([f"#### {kinds}", intro, table(_HEADERS, rows)])


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help or "" for a in sub._choices_actions}


def _run_section(parser: argparse.ArgumentParser, users: Iterable[str], common: set[object]) -> str:
    run = parser.commands["run"]
    builtin = {option.flag for spec in builtin_specs() for option in spec.options}
    plugin = {opt.flag for opt in run_options() if opt.sink} - builtin
    actions = [a for a in _actions(run) if not set(a.option_strings) & plugin]
    by_flag = {a.option_strings[0]: a for a in actions}
    shared = [_flag(a).row() for a in actions if _key(a) in common]
    own = [
        _flag(a).row()
        for a in actions
        if _key(a) not in common and a.option_strings[0] not in builtin
    ]
    without_env = [code(f.names) for f in map(_flag, actions) if not f.env]
    others = ", ".join(code(n) for n in users if n != "run")
    return "\n\n".join(
        [
            f"## `{PROG} run`",
            f"{_sentence(_command_help(parser)['run'])}: `{PROG}` with no command, or with "
            f"flags only, runs it.\n\n```\n{_usage(run)}\n```",
            "Every flag but "
            + " and ".join(without_env)
            + " can be set by its environment variable instead (the `env` column); the flag "
            "wins when both are given. A switch's variable takes `1`/`0`, `true`/`false`, "
            "`yes`/`no` or `on`/`off`. A repeatable flag's variable holds one value a line. "
            "`--dsn` defaults to `DATABASE_URL`; with neither, the worker starts an embedded "
            "PostgreSQL in a per-user data directory.",
            "### Database and logging",
            f"{others} take these flags too.",
            table(_HEADERS, shared),
            "### The worker",
            table(_HEADERS, own),
            "### Sinks",
            "Each built-in sink's own flags, also flags of `run`. A kind that is off turns its "
            "intents dead with a reason that names the flag to set.",
            *(_sink_section(spec, by_flag) for spec in builtin_specs()),
        ]
    )


def _command_section(
    name: str, parser: argparse.ArgumentParser, help: str, common: set[object]
) -> str:
    actions = _actions(parser)
    takes_common = bool(common) and common <= {_key(a) for a in actions}
    rows = [_flag(a).row() for a in actions if not (takes_common and _key(a) in common)]
    parts = [f"## `{PROG} {name}`", f"{_sentence(help)}.\n\n```\n{_usage(parser)}\n```"]
    if takes_common:
        parts.append("It takes the flags of [Database and logging](#database-and-logging), and:")
    parts.append(table(_HEADERS, rows) if rows else "No flags of its own.")
    return "\n\n".join(parts)


@functools.cache
def cli_page() -> str:
    parser = build_parser()
    users, common = _shared(parser.commands)
    helps = _command_help(parser)
    commands = [
        _command_section(name, sub, helps[name], common)
        for name, sub in parser.commands.items()
        if name != "run"
    ]
    return page(
        "Command line",
        "the argument parser (worker/cli/arguments.py, worker/cli/options.py, the built-in "
        "sinks' specs)",
        f"`{PROG} --help` shows the same flags; `{PROG} COMMAND --help` shows one command's.",
        _run_section(parser, users, common),
        *commands,
    )
