"""Logging set-up: plain or JSON lines, passwords masked where they stand in every record."""

from __future__ import annotations

import logging
import re
import sys
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import orjson

_secrets: set[str] = set()


# A password can also travel as a query parameter (libpq and asyncpg accept
# ``postgresql://app@db/x?password=...``) or in a libpq keyword/value string.
_PASSWORD_PARAMS = frozenset({"password", "sslpassword"})
_KEYWORD_PASSWORD_RE = re.compile(r"\b((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)
# The userinfo of any URL in free text (an exception that quotes its URL): user kept.
_URL_PASSWORD_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]*@")


def _is_password_param(pair: str) -> bool:
    return unquote_plus(pair.partition("=")[0]).strip().lower() in _PASSWORD_PARAMS


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
        if not parts.scheme:  # keyword/value form: host=... password=...
            return _KEYWORD_PASSWORD_RE.sub(r"\1***", url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        if parts.query:
            query = "&".join(
                f"{pair.partition('=')[0]}=***" if _is_password_param(pair) else pair
                for pair in parts.query.split("&")
            )
            parts = parts._replace(query=query)
        return urlunsplit(parts)
    except ValueError:
        return "<unparseable URL>"


def redact_text(text: str) -> str:
    """Passwords out of free text, where they stand: a URL's userinfo password, and a
    ``password=`` field (a URL's query, a libpq keyword/value string). Never by searching
    for a known value: a handler module named after the password stays as it is."""
    text = _URL_PASSWORD_RE.sub(r"\1***@", text)
    return _KEYWORD_PASSWORD_RE.sub(r"\1***", text)


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:  # the loop watchdog's stack of a blocked event loop
            entry["stack"] = record.stack_info
        return redact_text(orjson.dumps(entry).decode())


class _OneLineReconnectFailures(logging.Filter):
    """asyncpg's pool logs a full traceback on every failed reconnect while the database is
    down (each 1 to 60 s); one line says the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {one_line(record.exc_info[1])}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class _BrokerConnectionNoise(logging.Filter):
    """aiormq logs an ERROR per failed connect (hundreds a minute while RabbitMQ is down) and
    a warning with a traceback when a connection drops. The sink's ``ConnectGate`` says the
    same once per outage ("down", "back"), so these are debug lines here (shown with -v)."""

    _TEMPLATES = (
        "error when creating transport",
        "Unexpected connection close from remote",
        "Cancelling cause reader exited abnormally",
        "Server connection %r was stuck",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self._TEMPLATES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _add_filter(logger: str, kind: type[logging.Filter]) -> None:
    target = logging.getLogger(logger)
    if not any(isinstance(f, kind) for f in target.filters):
        target.addFilter(kind())


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _add_filter("asyncpg.pool", _OneLineReconnectFailures)
    _add_filter("aiormq.connection", _BrokerConnectionNoise)
