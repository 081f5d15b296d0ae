"""Payload -> RFC 5322 message bytes: pure functions that raise ``PermanentError`` for
anything that could not be sent safely (header injection, bad addresses, wrong types)."""

from __future__ import annotations

import re
from datetime import datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP as _SMTP_POLICY
from email.policy import default as _default_policy
from email.utils import format_datetime
from typing import Any

from worker.errors import PermanentError
from worker.intent import Intent

# ---------------------------------------------------------------------------------------------
# Payload -> message (pure)
# ---------------------------------------------------------------------------------------------

# Every character that ends or splits a line somewhere (str.splitlines() also breaks on
# \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029, and parts of the email package used it), plus
# the rest of C0/C1 and NUL. TAB stays allowed: it is ordinary folding whitespace.
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
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
    if CONTROL_RE.search(value):
        raise PermanentError(f"{where} contains a line break, NUL or other control character")
    if _ENCODED_WORD_RE.search(value):
        raise PermanentError(
            f"{where} contains an RFC 2047 encoded word ('=?...?='); pass plain text, "
            "non-ASCII is encoded automatically"
        )
    if len(value) > _MAX_HEADER_VALUE:
        raise PermanentError(f"{where} is longer than {_MAX_HEADER_VALUE} characters")


def parse_address(where: str, value: object) -> Address:
    """One mailbox: ``local@domain`` or ``Display Name <local@domain>``. ASCII addresses only."""
    if not isinstance(value, str):
        raise PermanentError(f"{where} must be a string, got {type(value).__name__}")
    if CONTROL_RE.search(value):
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
        return [parse_address(where, value)]
    return [parse_address(f"{where}[{i}]", item) for i, item in enumerate(items)]


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
    sender = parse_address("from", payload.get("from", default_from))

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
        raise PermanentError(f"cannot build the message: {short_text(str(exc), 200)}") from exc
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
        raise PermanentError(f"cannot serialize the message: {short_text(str(exc), 200)}") from exc
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


def short_text(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
