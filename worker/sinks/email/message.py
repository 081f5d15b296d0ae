"""Payload -> RFC 5322 message bytes: a pure function that raises ``PermanentError`` for
anything that could not be sent safely (header injection, bad addresses, wrong types).

The message is written directly from validated parts, not through ``email.message``:
that package parses every header value into a syntax tree when it is set, again when it
is serialized and again when it is read, ~1 ms per message, which was most of the CPU
the sink spent. Here every byte of the header section comes from

* a fixed header name, or a custom name checked against RFC 5322 ``ftext``;
* an ASCII value with no control characters (checked on the raw input), written as is
  and folded only before existing white space;
* or, for anything else (non-ASCII, or a word too long for a line), RFC 2047 ``B``
  encoded words, whose alphabet (``A-Za-z0-9+/=``) cannot express a line break;
* or an address ``local@domain`` that matched the dot-atom and domain patterns, with a
  display name written as atoms, a quoted string without quotes or backslashes, or
  encoded words.

So no payload can add a line, a header or a recipient: injection is excluded by
construction, and ``check_head`` re-checks the finished header section (one field per
expected name, in order; every other line a continuation) before anything is sent.
"""

from __future__ import annotations

import re
from email.utils import format_datetime

from worker.errors import PermanentError
from worker.intent import Intent
from worker.sinks.email.wire import (
    ATOM,
    CRLF,
    Mailbox,
    check_head,
    encode_body,
    fold_addresses,
    fold_text,
    multipart_alternative,
    single_part,
)

# ---------------------------------------------------------------------------------------------
# Payload -> message (pure)
# ---------------------------------------------------------------------------------------------

# Every character that ends or splits a line somewhere (str.splitlines() also breaks on
# \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029, and parts of the email package used it), plus
# the rest of C0/C1 and NUL. TAB stays allowed: it is ordinary folding whitespace.
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# A receiving parser decodes RFC 2047 encoded words it finds in a header, so a plain
# "=?utf-8?q?x=0D=0ABcc:_y?=" could become a line break further down the line (CPython
# issue 121650 was one). An encoded word needs "=?" ... "?="; a lone "=?" (as in "2+2=?")
# is harmless text.
_ENCODED_WORD_RE = re.compile(r"=\?.*\?=", re.DOTALL)
_HEADER_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")  # RFC 5322 ftext
_LOCAL_RE = re.compile(rf"^{ATOM}(?:\.{ATOM})*$")
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


def parse_address(where: str, value: object) -> Mailbox:
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
    return Mailbox(name, local, domain)


def _parse_address_list(where: str, value: object, *, required: bool) -> list[Mailbox]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise PermanentError(f"{where} must be a string or a list of strings")
    if required and not items:
        raise PermanentError(f"{where} is empty")
    if isinstance(value, str):
        return [parse_address(where, value)]
    return [parse_address(f"{where}[{i}]", item) for i, item in enumerate(items)]


def build_message(intent: Intent, default_from: str) -> tuple[bytes, str, list[str]]:
    """Validate ``intent.payload`` and build the message.

    Returns ``(message_bytes, envelope_sender, envelope_recipients)``: the message is 7-bit
    ASCII with CRLF line ends, ready for SMTP DATA, and the same for the same intent (a
    resend is byte-identical). The recipients are the validated To + Cc + Bcc addresses
    (deduplicated) and nothing else. Bcc is never a header.
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
    for mailbox in (*to, *cc, *bcc):
        spec = mailbox.addr_spec
        key = spec.lower()
        if key not in seen:
            seen.add(key)
            recipients.append(spec)
    if len(recipients) > _MAX_RECIPIENTS:
        raise PermanentError(f"email has {len(recipients)} recipients (at most {_MAX_RECIPIENTS})")

    # Date and Message-ID come from the intent, so a resend is byte-identical and the
    # receiving side can drop the duplicate (SMTP itself has no idempotency).
    headers: list[tuple[str, str]] = [("From", fold_addresses("From", [sender]))]
    headers.append(("To", fold_addresses("To", to)))
    if cc:
        headers.append(("Cc", fold_addresses("Cc", cc)))
    if reply_to:
        headers.append(("Reply-To", fold_addresses("Reply-To", reply_to)))
    headers.append(("Subject", fold_text("Subject", subject)))
    headers.append(("Date", "Date: " + format_datetime(intent.created_at)))
    headers.append(("Message-ID", f"Message-ID: <outbox-{intent.id}@{sender.domain.lower()}>"))
    headers.extend((name, fold_text(name, value)) for name, value in extra)
    try:
        parts = [
            (subtype, encode_body(content))
            for subtype, content in (("plain", text), ("html", html))
            if content is not None
        ]
        body = (
            multipart_alternative(headers, parts)
            if len(parts) > 1
            else single_part(headers, *parts[0])
        )
    except UnicodeError as exc:  # a lone surrogate: not text that can be sent
        raise PermanentError(f"cannot build the message: {type(exc).__name__}") from None
    head = CRLF.join(line for _, line in headers)
    check_head(head, [name for name, _ in headers])
    return (head + CRLF + CRLF).encode("ascii") + body, sender.addr_spec, recipients


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


# -- header fields ----------------------------------------------------------------------------


def short_text(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
