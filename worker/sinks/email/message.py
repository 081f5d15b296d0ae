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
construction, and ``_check_head`` re-checks the finished header section (one field per
expected name, in order; every other line a continuation) before anything is sent.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass
from email.utils import format_datetime

from worker.errors import PermanentError
from worker.intent import Intent

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

# Output: 7-bit ASCII with CRLF line ends (bodies quoted-printable or base64 when needed,
# headers encoded words), so the server needs neither 8BITMIME nor SMTPUTF8.
_CRLF = "\r\n"
_MAX_LINE = 78  # RFC 5322 2.1.1 SHOULD; the MUST (998) then holds with room to spare
_MAX_WIRE_LINE = 998
# An encoded word is at most 75 characters (RFC 2047 2): "=?utf-8?b?" + base64 + "?=",
# and 45 bytes of UTF-8 are 60 characters of base64.
_EW_OVERHEAD = len("=?utf-8?b?") + len("?=")
_EW_MAX_BYTES = 45
# Display names that can go out as they are: atoms separated by single spaces (RFC 5322
# phrase), or anything printable without '"' or '\' as one quoted string. Up to a length
# that keeps the line under 998; anything else (non-ASCII) becomes encoded words.
_PHRASE_RE = re.compile(rf"^{_ATOM}(?: {_ATOM})*$")
_QUOTABLE_RE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$")
_MAX_PLAIN_NAME = 900
_WORDS_RE = re.compile(r"[ \t]*[^ \t]+")  # a word with the white space before it
_HIGH_BYTES = bytes(range(0x7F, 0x100))
_NOT_HEADER_TEXT_RE = re.compile(r"[^\t\x20-\x7e]")  # in a header line: VCHAR and WSP only


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


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One validated mailbox: ``local`` and ``domain`` matched dot-atom and host name
    patterns; ``display_name`` has no control characters, quotes, backslashes, angle
    brackets or encoded-word markers."""

    display_name: str
    local: str
    domain: str

    @property
    def addr_spec(self) -> str:
        return f"{self.local}@{self.domain}"


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
    headers: list[tuple[str, str]] = [("From", _fold_addresses("From", [sender]))]
    headers.append(("To", _fold_addresses("To", to)))
    if cc:
        headers.append(("Cc", _fold_addresses("Cc", cc)))
    if reply_to:
        headers.append(("Reply-To", _fold_addresses("Reply-To", reply_to)))
    headers.append(("Subject", _fold_text("Subject", subject)))
    headers.append(("Date", "Date: " + format_datetime(intent.created_at)))
    headers.append(("Message-ID", f"Message-ID: <outbox-{intent.id}@{sender.domain.lower()}>"))
    headers.extend((name, _fold_text(name, value)) for name, value in extra)
    try:
        parts = [
            (subtype, _encode_body(content))
            for subtype, content in (("plain", text), ("html", html))
            if content is not None
        ]
        body = (
            _multipart_alternative(headers, parts)
            if len(parts) > 1
            else _single_part(headers, *parts[0])
        )
    except UnicodeError as exc:  # a lone surrogate: not text that can be sent
        raise PermanentError(f"cannot build the message: {type(exc).__name__}") from None
    head = _CRLF.join(line for _, line in headers)
    _check_head(head, [name for name, _ in headers])
    return (head + _CRLF + _CRLF).encode("ascii") + body, sender.addr_spec, recipients


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


def _fold(name: str, tokens: list[str]) -> str:
    """``Name: token token...`` as one field, a line break before a token where a line
    would pass 78 characters. Every token after the first starts with white space and has
    something else after it, so each continuation line starts with white space and no
    line is blank or white space only (some parsers end the header section there)."""
    line = f"{name}:" if not tokens else f"{name}: {tokens[0]}"
    lines: list[str] = []
    for token in tokens[1:]:
        if len(line) + len(token) > _MAX_LINE:
            lines.append(line)
            line = token
        else:
            line += token
    lines.append(line)
    return _CRLF.join(lines)


def _encoded_words(text: str, first_room: int) -> list[str]:
    """``text`` as RFC 2047 ``B`` encoded words, split between characters, the first one
    fitting in ``first_room`` characters where it can, each one at most 75; tokens for
    ``_fold`` (all but the first start with a space, which a decoder drops between
    adjacent encoded words, so the decoded value is exactly ``text``)."""
    data = text.encode("utf-8")
    words: list[str] = []
    budget = max(4, min(_EW_MAX_BYTES, (first_room - _EW_OVERHEAD) // 4 * 3))
    start = 0
    while start < len(data):
        end = min(start + budget, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        chunk = binascii.b2a_base64(data[start:end], newline=False).decode("ascii")
        words.append(("=?utf-8?b?" if not words else " =?utf-8?b?") + chunk + "?=")
        start, budget = end, _EW_MAX_BYTES
    return words


def _fold_text(name: str, value: str) -> str:
    """An unstructured field (Subject, custom headers). ``value`` passed ``_check_text``."""
    if value.isascii():
        tokens = _WORDS_RE.findall(value)
        rest = value[sum(map(len, tokens)) :]  # trailing white space
        if rest:
            tokens = [*tokens[:-1], tokens[-1] + rest] if tokens else [rest]
        first = len(name) + 2 + (len(tokens[0]) if tokens else 0)
        if first <= _MAX_LINE and all(len(t) < _MAX_LINE for t in tokens[1:]):
            return _fold(name, tokens)
    # Non-ASCII, or a word too long to fold: all of it as encoded words.
    return _fold(name, _encoded_words(value, _MAX_LINE - len(name) - 2))


def _mailbox_tokens(mailbox: Mailbox) -> list[str]:
    addr = f"<{mailbox.addr_spec}>"
    name = mailbox.display_name
    if not name:
        return [mailbox.addr_spec]
    if len(name) <= _MAX_PLAIN_NAME:
        if _PHRASE_RE.match(name):
            words = name.split(" ")
            return [words[0], *(" " + w for w in words[1:]), " " + addr]
        if _QUOTABLE_RE.match(name):
            return [f'"{name}"', " " + addr]
    # (Python's own address parser, unlike RFC 2047 6.2 and compat32's decode_header,
    # keeps the space between adjacent encoded words: a name over 45 bytes of UTF-8 reads
    # back there with a space where it was split. The stdlib writes such names the same.)
    return [*_encoded_words(name, _MAX_LINE - len("Reply-To: ")), " " + addr]


def _fold_addresses(name: str, mailboxes: list[Mailbox]) -> str:
    tokens: list[str] = []
    for mailbox in mailboxes:
        parts = _mailbox_tokens(mailbox)
        if tokens:
            tokens[-1] += ","
            parts[0] = " " + parts[0]
        tokens.extend(parts)
    return _fold(name, tokens)


def _check_head(head: str, names: list[str]) -> None:
    """The header section is exactly the fields that were built, in order, 7-bit, no line
    longer than 998, every other line a continuation with something on it. True by
    construction; checked because a mistake here would be a header injection."""
    lines = head.split(_CRLF)
    fields = [line.partition(":")[0] for line in lines if line[:1] not in (" ", "\t")]
    if (
        fields != names
        or _NOT_HEADER_TEXT_RE.search(head.replace(_CRLF, ""))
        or any(len(line) > _MAX_WIRE_LINE or not line.strip() for line in lines)
    ):
        raise PermanentError("message header section is malformed; refusing to send")


# -- bodies -----------------------------------------------------------------------------------


def _encode_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body ending in CRLF): 7bit if it already is
    (ASCII, lines up to 78), else quoted-printable or base64, whichever is shorter."""
    lines = text.encode("utf-8").splitlines()
    data = b"\r\n".join(lines) + b"\r\n"
    if data.isascii() and max(map(len, lines), default=0) <= _MAX_LINE:
        return "7bit", data
    high = len(data) - len(data.translate(None, _HIGH_BYTES))  # each becomes =XX in QP
    if len(data) + 2 * high <= len(data) * 4 // 3:
        return "quoted-printable", binascii.b2a_qp(data, istext=True)
    chunks = [binascii.b2a_base64(data[i : i + 57], newline=False) for i in range(0, len(data), 57)]
    return "base64", b"\r\n".join(chunks) + b"\r\n"


def _part_headers(subtype: str, cte: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", f'Content-Type: text/{subtype}; charset="utf-8"'),
        ("Content-Transfer-Encoding", f"Content-Transfer-Encoding: {cte}"),
    ]


def _single_part(headers: list[tuple[str, str]], subtype: str, encoded: tuple[str, bytes]) -> bytes:
    cte, body = encoded
    headers.extend(_part_headers(subtype, cte))
    headers.append(("MIME-Version", "MIME-Version: 1.0"))
    return body


def _multipart_alternative(
    headers: list[tuple[str, str]], encoded: list[tuple[str, tuple[str, bytes]]]
) -> bytes:
    parts = [
        (_CRLF.join(line for _, line in _part_headers(subtype, cte)).encode("ascii"), body)
        for subtype, (cte, body) in encoded
    ]
    # The boundary comes from the content (a resend is byte-identical) and must not occur
    # in it: it cannot in quoted-printable or base64 ('_' is in neither), and a 7bit part
    # that holds it (which takes a SHA-256 preimage) gets another one.
    digest = hashlib.sha256(b"\0".join(body for _, body in parts)).hexdigest()[:32]
    boundary, n = f"=_outbox_{digest}", 0
    while any(boundary.encode("ascii") in body for _, body in parts):
        n += 1
        boundary = f"=_outbox_{digest}_{n}"
    headers.append(("MIME-Version", "MIME-Version: 1.0"))
    headers.append(
        ("Content-Type", f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')
    )
    delimiter = f"--{boundary}\r\n".encode("ascii")
    out = [delimiter]
    for i, (part_head, body) in enumerate(parts):
        if i:
            out.append(b"\r\n" + delimiter)
        out += [part_head, b"\r\n\r\n", body]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def short_text(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
