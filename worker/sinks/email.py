"""The ``email`` kind: deliver an intent as one SMTP message over pooled connections.

Three layers, each testable alone:

* ``parse_smtp_url`` turns the operator's URL into a ``SmtpConfig`` (``ConfigError`` if bad);
* ``build_message`` / ``serialize_message`` turn a payload into bytes, pure functions that
  raise ``PermanentError`` for anything that could not be sent safely;
* ``EmailSink`` keeps a small pool of connected clients and maps SMTP outcomes to
  ``TransientError`` / ``PermanentError``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP as _SMTP_POLICY
from email.policy import default as _default_policy
from email.utils import format_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import anyio
from aiosmtplib import (
    SMTP,
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from worker.errors import ConfigError, DeliveryError, PermanentError, TransientError
from worker.intent import Intent

__all__ = [
    "EmailSink",
    "SmtpConfig",
    "TlsMode",
    "build_message",
    "classify_smtp_error",
    "parse_smtp_url",
    "serialize_message",
]

log = logging.getLogger(__name__)

TlsMode = Literal["opportunistic", "starttls", "none", "implicit"]
_TLS_MODES: tuple[TlsMode, ...] = ("opportunistic", "starttls", "none", "implicit")
_DEFAULT_PORTS: dict[TlsMode, int] = {
    "opportunistic": 25,
    "starttls": 587,
    "none": 25,
    "implicit": 465,
}
DEFAULT_TIMEOUT = 30.0
_MAX_TIMEOUT = 3600.0

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_QUERY_KEYS = frozenset({"tls", "cafile", "timeout", "insecure_auth", "helo"})


@dataclass(frozen=True, slots=True, repr=False)
class SmtpConfig:
    """Where and how to connect. ``repr``/``str``/``redacted()`` never show the password."""

    host: str
    port: int
    tls: TlsMode = "opportunistic"
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    insecure_auth: bool = False
    helo: str | None = None  # EHLO name; default: this machine's FQDN

    def redacted(self) -> str:
        """The configuration as a URL, with the password replaced by ``***``."""
        scheme = "smtps" if self.tls == "implicit" else "smtp"
        userinfo = ""
        if self.username is not None:
            userinfo = (
                quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        params: list[str] = []
        if self.tls not in ("opportunistic", "implicit"):
            params.append(f"tls={self.tls}")
        if self.cafile is not None:
            params.append("cafile=" + quote(self.cafile, safe="/"))
        if self.timeout != DEFAULT_TIMEOUT:
            params.append(f"timeout={self.timeout:g}")
        if self.insecure_auth:
            params.append("insecure_auth=1")
        if self.helo is not None:
            params.append(f"helo={self.helo}")
        query = ("?" + "&".join(params)) if params else ""
        return f"{scheme}://{userinfo}{host}:{self.port}{query}"

    def __repr__(self) -> str:
        return f"SmtpConfig({self.redacted()!r})"

    __str__ = redacted


def parse_smtp_url(url: str) -> SmtpConfig:
    """Parse ``smtp[s]://[user:password@]host[:port][?tls=&cafile=&timeout=&insecure_auth=&helo=]``.

    Error messages never echo any part of the URL: a password with an unescaped ``/``, ``#``
    or ``?`` ends up parsed as port, path or query, and would leak through an echo.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("SMTP URL is empty")
    # `from None` below: a ValueError's text may quote part of the URL (and the password).
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ConfigError("SMTP URL cannot be parsed (unbalanced brackets?)") from None
    if parts.scheme.lower() not in ("smtp", "smtps"):
        raise ConfigError("SMTP URL must start with smtp:// or smtps://")
    scheme = parts.scheme.lower()
    if parts.fragment or "#" in url:
        raise ConfigError(
            "SMTP URL contains '#'; percent-encode it (%23) if it is part of the password"
        )
    try:
        raw_port = parts.port
    except ValueError:
        raise ConfigError(
            "SMTP URL has an invalid port; percent-encode reserved characters such as "
            "/ ? @ : in the user name and password"
        ) from None
    if parts.path not in ("", "/"):
        raise ConfigError(
            "SMTP URL must not have a path; percent-encode '/' (%2F) in the user name or password"
        )
    host = _parse_host(parts.hostname)
    username, password = _parse_userinfo(parts)

    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError("SMTP URL query string is malformed (expected key=value&...)") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise ConfigError(
                "SMTP URL has an unknown query parameter; allowed: "
                + ", ".join(sorted(_QUERY_KEYS))
            )
        if key in params:
            raise ConfigError(f"SMTP URL repeats the query parameter {key!r}")
        params[key] = value

    tls = _parse_tls(scheme, params.get("tls"))
    port = raw_port if raw_port is not None else _DEFAULT_PORTS[tls]
    if not 1 <= port <= 65535:
        raise ConfigError("SMTP URL port must be between 1 and 65535")
    timeout = _parse_timeout(params.get("timeout"))
    insecure_auth = _parse_bool("insecure_auth", params.get("insecure_auth"))
    cafile = params.get("cafile")
    if cafile is not None and not cafile:
        raise ConfigError("SMTP URL has an empty cafile=")
    if cafile is not None and tls == "none":
        raise ConfigError("SMTP URL sets cafile= with tls=none; drop one of them")
    helo = params.get("helo")
    if helo is not None and not (_HOSTNAME_RE.match(helo) or _is_ip(helo)):
        raise ConfigError("SMTP URL helo= must be a host name")
    if username is not None and tls == "none" and not insecure_auth:
        raise ConfigError(
            "SMTP URL has credentials with tls=none, which would send the password in clear; "
            "use TLS or add insecure_auth=1"
        )
    return SmtpConfig(
        host=host,
        port=port,
        tls=tls,
        username=username,
        password=password,
        cafile=cafile,
        timeout=timeout,
        insecure_auth=insecure_auth,
        helo=helo,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_host(hostname: str | None) -> str:
    if not hostname:
        raise ConfigError("SMTP URL has no host")
    if not (_HOSTNAME_RE.match(hostname) or _is_ip(hostname)):
        raise ConfigError("SMTP URL host is not a valid host name or IP address")
    return hostname


def _parse_userinfo(parts: Any) -> tuple[str | None, str | None]:
    if parts.username is None:
        return None, None
    username = unquote(parts.username)
    if not username:
        raise ConfigError("SMTP URL has an empty user name")
    if parts.password is None:
        raise ConfigError("SMTP URL has a user name but no password (user:password@host)")
    password = unquote(parts.password)
    if _CONTROL_RE.search(username) or _CONTROL_RE.search(password):
        raise ConfigError("SMTP URL user name or password contains control characters")
    return username, password


def _parse_tls(scheme: str, value: str | None) -> TlsMode:
    if scheme == "smtps":
        if value not in (None, "implicit"):
            raise ConfigError("smtps:// is implicit TLS; drop tls= or use smtp://")
        return "implicit"
    if value is None:
        return "opportunistic"
    for mode in _TLS_MODES:
        if value == mode:
            return mode
    raise ConfigError("SMTP URL tls= must be one of: " + ", ".join(_TLS_MODES))


def _parse_timeout(value: str | None) -> float:
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and 0 < timeout <= _MAX_TIMEOUT):
        raise ConfigError(f"SMTP URL timeout= must be a number of seconds in (0, {_MAX_TIMEOUT:g}]")
    return timeout


def _parse_bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"SMTP URL {name}= must be 1 or 0")


# ---------------------------------------------------------------------------------------------
# Payload -> message (pure)
# ---------------------------------------------------------------------------------------------

# Every character that ends or splits a line somewhere (str.splitlines() also breaks on
# \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029, and parts of the email package used it), plus
# the rest of C0/C1 and NUL. TAB stays allowed: it is ordinary folding whitespace.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# The email package decodes RFC 2047 encoded words it finds in a value it is given, so
# "=?utf-8?q?x=0D=0ABcc:_y?=" would become a real line break (CPython issue 121650).
# An encoded word needs "=?" ... "?="; a lone "=?" (as in "2+2=?") is harmless text.
_ENCODED_WORD_RE = re.compile(r"=\?.*\?=", re.DOTALL)
_HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 ftext
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_RE = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_DOMAIN_RE = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_NAME_ADDR_RE = re.compile(r"^(?P<name>.*?)\s*<(?P<addr>[^<>]*)>$", re.DOTALL)

_MAX_HEADER_VALUE = 998
_MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: the minimum a server must accept per message
_FIELDS = frozenset({"to", "cc", "bcc", "reply_to", "from", "subject", "text", "html", "headers"})
# Headers this sink writes itself or that define the MIME structure: a payload cannot
# override them through `headers` (a second From/To or a Bcc there would bypass the
# address validation, a Content-Type would break the body).
_OWNED_HEADERS = frozenset(
    {
        "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
        "mime-version", "return-path", "orig-date", "received",
    }
)  # fmt: skip
_OWNED_PREFIXES = ("content-", "resent-")
_ADDRESS_HEADERS = ("from", "to", "cc", "reply-to")

# 7bit: bodies become quoted-printable/base64 and headers encoded words, so the bytes are
# ASCII with CRLF line ends and need neither 8BITMIME nor SMTPUTF8 from the server.
_POLICY = _SMTP_POLICY.clone(cte_type="7bit")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(where: str, value: str) -> None:
    """Raise unless ``value`` is safe as (part of) one header value."""
    if _CONTROL_RE.search(value):
        raise PermanentError(f"{where} contains a line break, NUL or other control character")
    if _ENCODED_WORD_RE.search(value):
        raise PermanentError(
            f"{where} contains an RFC 2047 encoded word ('=?...?='); pass plain text, "
            "non-ASCII is encoded automatically"
        )
    if len(value) > _MAX_HEADER_VALUE:
        raise PermanentError(f"{where} is longer than {_MAX_HEADER_VALUE} characters")


def _parse_address(where: str, value: object) -> Address:
    """One mailbox: ``local@domain`` or ``Display Name <local@domain>``. ASCII addresses only."""
    if not isinstance(value, str):
        raise PermanentError(f"{where} must be a string, got {type(value).__name__}")
    if _CONTROL_RE.search(value):
        raise PermanentError(f"{where} contains a line break, NUL or other control character")
    if "=?" in value:  # no encoded words anywhere near an address
        raise PermanentError(f"{where} contains an encoded-word marker '=?': {_short(value)}")
    text = value.strip()
    name = ""
    match = _NAME_ADDR_RE.match(text)
    if match:
        name, addr = match["name"].strip(), match["addr"].strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = name[1:-1]
        if any(c in name for c in '"\\<>'):
            raise PermanentError(f"{where} has a display name with quotes or brackets")
    else:
        addr = text
    local, at, domain = addr.rpartition("@")
    if (
        not at
        or len(addr) > 254
        or len(local) > 64
        or not _LOCAL_RE.match(local)
        or not _DOMAIN_RE.match(domain)
    ):
        raise PermanentError(f"{where} is not a valid email address: {_short(value)}")
    return Address(display_name=name, username=local, domain=domain)


def _parse_address_list(where: str, value: object, *, required: bool) -> list[Address]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise PermanentError(f"{where} must be a string or a list of strings")
    if required and not items:
        raise PermanentError(f"{where} is empty")
    if isinstance(value, str):
        return [_parse_address(where, value)]
    return [_parse_address(f"{where}[{i}]", item) for i, item in enumerate(items)]


def build_message(intent: Intent, default_from: str) -> tuple[EmailMessage, str, list[str]]:
    """Validate ``intent.payload`` and build the message.

    Returns ``(message, envelope_sender, envelope_recipients)``; the recipients are the
    validated To + Cc + Bcc addresses (deduplicated) and nothing else. Bcc is never a header.
    Raises ``PermanentError`` for any payload that cannot be sent as given.
    """
    payload = intent.payload
    if not isinstance(payload, dict):
        raise PermanentError(f"email payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in payload if k not in _FIELDS)
    if unknown:
        raise PermanentError(
            "email payload has unknown field(s): " + ", ".join(_short(k, 40) for k in unknown)
        )
    if "to" not in payload:
        raise PermanentError("email payload has no 'to'")
    to = _parse_address_list("to", payload["to"], required=True)
    cc = _parse_address_list("cc", payload.get("cc", []), required=False)
    bcc = _parse_address_list("bcc", payload.get("bcc", []), required=False)
    reply_to = _parse_address_list("reply_to", payload.get("reply_to", []), required=False)
    sender = _parse_address("from", payload.get("from", default_from))

    subject = payload.get("subject")
    if not isinstance(subject, str):
        raise PermanentError("email payload needs 'subject' as a string")
    _check_text("subject", subject)

    text, html = payload.get("text"), payload.get("html")
    if text is None and html is None:
        raise PermanentError("email payload needs 'text' and/or 'html'")
    for key, body in (("text", text), ("html", html)):
        if body is not None and not isinstance(body, str):
            raise PermanentError(f"{key} must be a string, got {type(body).__name__}")
        if isinstance(body, str) and "\x00" in body:
            raise PermanentError(f"{key} contains a NUL character")

    extra = _validate_extra_headers(payload.get("headers", {}))

    recipients: list[str] = []
    seen: set[str] = set()
    for addr in (*to, *cc, *bcc):
        key = addr.addr_spec.lower()
        if key not in seen:
            seen.add(key)
            recipients.append(addr.addr_spec)
    if len(recipients) > _MAX_RECIPIENTS:
        raise PermanentError(f"email has {len(recipients)} recipients (at most {_MAX_RECIPIENTS})")

    try:
        msg = _assemble(intent.id, intent.created_at, sender, to, cc, reply_to, subject, extra)
        if text is not None:
            msg.set_content(text)
            if html is not None:
                msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    except (ValueError, TypeError, LookupError, MessageError) as exc:
        # Building is deterministic: whatever the email package rejects now it always will.
        raise PermanentError(f"cannot build the message: {_reply_text(str(exc), 200)}") from exc
    return msg, sender.addr_spec, recipients


def _assemble(
    intent_id: int,
    created_at: datetime,
    sender: Address,
    to: list[Address],
    cc: list[Address],
    reply_to: list[Address],
    subject: str,
    extra: list[tuple[str, str]],
) -> EmailMessage:
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    # Date and Message-ID come from the intent, so a resend is byte-identical and the
    # receiving side can drop the duplicate (SMTP itself has no idempotency).
    msg["Date"] = format_datetime(created_at)
    msg["Message-ID"] = f"<outbox-{intent_id}@{sender.domain.lower()}>"
    for name, value in extra:
        msg[name] = value
    return msg


def _validate_extra_headers(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        raise PermanentError("headers must be an object of string to string")
    result: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise PermanentError(f"headers: {_short(name, 40)} is not a valid header field name")
        lower = name.lower()
        if lower in _OWNED_HEADERS or lower.startswith(_OWNED_PREFIXES):
            raise PermanentError(f"headers: {name} is set by the sink and cannot be overridden")
        if lower in seen:
            raise PermanentError(f"headers: {name} is given twice")
        seen.add(lower)
        if not isinstance(header_value, str):
            raise PermanentError(f"headers: {name} must be a string")
        _check_text(f"headers: {name}", header_value)
        result.append((name, header_value))
    return result


def serialize_message(msg: EmailMessage) -> bytes:
    """The bytes to send, after checking they parse back to the headers that were built.

    Input validation is the first line of defence; this is the second. If the email
    package ever folds or decodes a value into an extra line, the parsed-back header list
    or address lists differ and the message is refused instead of sent.
    """
    try:
        data = msg.as_bytes(policy=_POLICY)
    except (ValueError, TypeError, LookupError, MessageError) as exc:
        raise PermanentError(f"cannot serialize the message: {_reply_text(str(exc), 200)}") from exc
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        raise PermanentError("message did not serialize to 7-bit ASCII") from None
    if any(len(line) > 998 for line in data.split(b"\r\n")):
        raise PermanentError("message has a line longer than 998 octets")
    parsed = BytesParser(policy=_default_policy).parsebytes(data, headersonly=True)
    if [k.lower() for k in parsed] != [k.lower() for k in msg]:
        raise PermanentError("message headers changed in serialization; refusing to send")
    for name in _ADDRESS_HEADERS:
        built, got = msg[name], parsed[name]
        if built is None and got is None:
            continue
        if built is None or got is None or _addr_specs(built) != _addr_specs(got):
            raise PermanentError(f"{name} addresses changed in serialization; refusing to send")
    return data


def _addr_specs(header: Any) -> list[str]:
    return [a.addr_spec.lower() for a in getattr(header, "addresses", ())]


# ---------------------------------------------------------------------------------------------
# SMTP outcomes -> delivery errors (pure)
# ---------------------------------------------------------------------------------------------


def _reply_text(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _by_code(code: int, what: str) -> DeliveryError:
    if 500 <= code <= 599:
        return PermanentError(what)
    return TransientError(what)  # 4xx, and anything unexpected, may work next time


def classify_smtp_error(exc: BaseException) -> DeliveryError:
    """Map an exception from a mail transaction (MAIL/RCPT/DATA) to a delivery outcome."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, SMTPRecipientsRefused):
        # Every recipient was refused (a partial refusal never gets here, see _transact).
        details = "; ".join(
            f"{r.recipient}: {r.code} {_reply_text(r.message, 120)}" for r in exc.recipients
        )
        what = f"all recipients refused at RCPT TO: {details}"
        if exc.recipients and all(500 <= r.code <= 599 for r in exc.recipients):
            return PermanentError(what)
        return TransientError(what)
    if isinstance(exc, SMTPResponseException):
        if isinstance(exc, SMTPSenderRefused):
            stage = " at MAIL FROM"
        elif isinstance(exc, SMTPRecipientRefused):
            stage = " at RCPT TO"
        elif isinstance(exc, SMTPDataError):
            stage = " at DATA"
        else:
            stage = ""
        return _by_code(exc.code, f"SMTP {exc.code}{stage}: {_reply_text(exc.message)}")
    # Disconnects (including one after the final "." before the reply), timeouts, resets:
    # the server may or may not have the message. At-least-once: assume it does not and
    # send again; the fixed Message-ID lets the receiving side spot the duplicate.
    if isinstance(exc, TimeoutError):
        return TransientError("SMTP server did not answer in time")
    if isinstance(exc, SMTPServerDisconnected):
        return TransientError(f"SMTP connection lost: {_reply_text(exc.message)}")
    if isinstance(exc, SMTPException):
        return TransientError(f"SMTP error: {_reply_text(exc.message)}")
    return TransientError(f"SMTP connection failed: {type(exc).__name__}: {_reply_text(str(exc))}")


# ---------------------------------------------------------------------------------------------
# The sink
# ---------------------------------------------------------------------------------------------

# An idle connection older than this is closed rather than reused: servers drop idle
# clients (Postfix after 300 s, others sooner), and a dead one costs a failed command.
_IDLE_TTL = 30.0
# Some servers cap messages per connection (Exchange 20 by default, others ~100).
_MAX_MESSAGES_PER_CONNECTION = 100
_QUIT_TIMEOUT = 2.0


@dataclass
class _Conn:
    client: SMTP
    idle_since: float = 0.0
    sent: int = 0


class _ConnectRefused(Exception):
    """A connection we refuse to use (no TLS where required, AUTH in clear)."""


class EmailSink:
    """Delivers ``email`` intents over at most ``max_connections`` reused SMTP connections.

    ``deliver`` may be called from many tasks at once: each call holds one connection for
    its whole transaction and returns it to the pool only after a success.
    """

    def __init__(self, config: SmtpConfig, mail_from: str, max_connections: int) -> None:
        if max_connections < 1:
            raise ConfigError("email sink needs max_connections >= 1")
        try:
            _parse_address("mail_from", mail_from)
        except PermanentError as exc:
            raise ConfigError(f"invalid sender address: {exc}") from None
        self._config = config
        self._mail_from = mail_from
        self._tls_context: ssl.SSLContext | None = None
        if config.tls != "none":
            try:
                self._tls_context = ssl.create_default_context(cafile=config.cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load cafile {config.cafile!r}: {exc}") from None
        self._slots = anyio.Semaphore(max_connections)
        self._idle: list[_Conn] = []  # LIFO: the most recently used is the most likely alive
        self._helo: str | None = config.helo
        self._closed = False

    def __repr__(self) -> str:
        return f"EmailSink({self._config.redacted()!r})"

    async def deliver(self, intent: Intent) -> None:
        # Validation and serialization happen before any I/O: a bad payload never reaches
        # the server and never costs a connection.
        msg, sender, recipients = build_message(intent, self._mail_from)
        data = serialize_message(msg)
        async with self._slots:
            conn = await self._checkout()
            try:
                try:
                    await self._transact(conn, intent.id, sender, recipients, data)
                except _StaleConnection:
                    # A pooled connection the server had already dropped: nothing was
                    # accepted, so retry once on a fresh one instead of failing the intent.
                    conn.client.close()
                    conn = _Conn(await self._connect())
                    await self._transact(conn, intent.id, sender, recipients, data)
            except BaseException:
                # After any error (or cancellation) the session state is unknown: discard.
                conn.client.close()
                raise
            self._checkin(conn)

    async def aclose(self) -> None:
        """Close idle connections (QUIT, bounded); in-flight ones close when they finish."""
        self._closed = True
        idle, self._idle = self._idle, []
        async with anyio.create_task_group() as tg:
            for conn in idle:
                tg.start_soon(_quit, conn.client)

    # -- pool -----------------------------------------------------------------------------

    async def _checkout(self) -> _Conn:
        if self._closed:
            raise TransientError("email sink is closed")
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.client.is_connected and now - conn.idle_since < _IDLE_TTL:
                return conn
            conn.client.close()
        return _Conn(await self._connect())

    def _checkin(self, conn: _Conn) -> None:
        conn.sent += 1
        if (
            self._closed
            or not conn.client.is_connected
            or conn.sent >= _MAX_MESSAGES_PER_CONNECTION
        ):
            conn.client.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _helo_name(self) -> str:
        if self._helo is None:
            # getfqdn may do a blocking reverse lookup; do it once, off the event loop.
            self._helo = await anyio.to_thread.run_sync(socket.getfqdn) or "localhost"
        return self._helo

    async def _connect(self) -> SMTP:
        cfg = self._config
        client = SMTP(
            hostname=cfg.host,
            port=cfg.port,
            use_tls=cfg.tls == "implicit",
            start_tls=False,  # decided below, so that a required STARTTLS cannot be skipped
            tls_context=self._tls_context,
            timeout=cfg.timeout,
            local_hostname=await self._helo_name(),
        )
        try:
            await client.connect()
            await client.ehlo()
            if cfg.tls in ("starttls", "opportunistic"):
                if client.supports_extension("starttls"):
                    # A failed handshake (e.g. an untrusted certificate) raises here and
                    # the connection is closed: no fallback to plaintext, no AUTH.
                    await client.starttls()
                    await client.ehlo()
                elif cfg.tls == "starttls":
                    raise _ConnectRefused("server does not offer STARTTLS (tls=starttls)")
            if cfg.username is not None:
                encrypted = client.get_transport_info("sslcontext") is not None
                if not encrypted and not cfg.insecure_auth:
                    raise _ConnectRefused(
                        "refusing to send AUTH over an unencrypted connection "
                        "(server offered no STARTTLS; add insecure_auth=1 to allow)"
                    )
                await client.login(cfg.username, cfg.password or "")
        except BaseException as exc:
            client.close()
            if isinstance(exc, Exception):
                # Connection-level failures (refused, TLS, EHLO, AUTH, even a 5xx greeting
                # or a 535) are about the server or our configuration, not this message:
                # transient, so a password rotation or certificate problem does not turn
                # the whole queue into dead letters.
                where = f"{cfg.host}:{cfg.port}"
                if isinstance(exc, _ConnectRefused):
                    why = str(exc)
                elif isinstance(exc, SMTPResponseException):
                    why = f"{exc.code} {_reply_text(exc.message)}"
                elif isinstance(exc, SMTPException):
                    why = _reply_text(exc.message)
                else:
                    why = f"{type(exc).__name__}: {_reply_text(str(exc))}"
                raise TransientError(f"SMTP connect to {where} failed: {why}") from exc
            raise
        return client

    # -- one mail transaction -------------------------------------------------------------

    async def _transact(
        self, conn: _Conn, intent_id: int, sender: str, recipients: list[str], data: bytes
    ) -> None:
        client = conn.client
        options = [f"SIZE={len(data)}"] if client.supports_extension("size") else []
        try:
            await client.mail(sender, options=options)
        except (ConnectionError, SMTPSenderRefused) as exc:
            gone = isinstance(exc, ConnectionError) or exc.code == 421
            if conn.sent > 0 and gone:  # only a reused connection can be stale
                raise _StaleConnection from exc
            raise classify_smtp_error(exc) from exc
        except Exception as exc:
            raise classify_smtp_error(exc) from exc
        try:
            refused: list[SMTPRecipientRefused] = []
            for rcpt in recipients:
                try:
                    await client.rcpt(rcpt)
                except SMTPRecipientRefused as exc:
                    refused.append(exc)
            if len(refused) == len(recipients):
                raise SMTPRecipientsRefused(refused)
            await client.data(data)
        except Exception as exc:
            raise classify_smtp_error(exc) from exc
        if refused:
            # Some recipients accepted, some refused: the message is out and a resend would
            # duplicate it for everyone who got it, so this counts as sent. The refusals
            # are logged; the server usually sends a bounce for them as well.
            log.warning(
                "intent %s: sent, but %d of %d recipients refused: %s",
                intent_id,
                len(refused),
                len(recipients),
                "; ".join(f"{r.recipient}: {r.code} {_reply_text(r.message)}" for r in refused),
            )


class _StaleConnection(Exception):
    """A reused connection failed before the server accepted anything."""


async def _quit(client: SMTP) -> None:
    with anyio.move_on_after(_QUIT_TIMEOUT), contextlib.suppress(Exception):
        await client.quit()
    client.close()
