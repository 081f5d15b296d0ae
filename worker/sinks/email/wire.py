"""Validated parts -> the bytes on the wire: header fields folded at white space or written
as RFC 2047 encoded words, bodies in 7bit, quoted-printable or base64, and the final check
of the header section. Nothing here validates a payload (message.py does): every input is
already known to be safe, and ``check_head`` re-checks the result anyway.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass

from worker.errors import PermanentError

ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# Output: 7-bit ASCII with CRLF line ends (bodies quoted-printable or base64 when needed,
# headers encoded words), so the server needs neither 8BITMIME nor SMTPUTF8.
CRLF = "\r\n"
_MAX_LINE = 78  # RFC 5322 2.1.1 SHOULD; the MUST (998) then holds with room to spare
_MAX_WIRE_LINE = 998
# An encoded word is at most 75 characters (RFC 2047 2): "=?utf-8?b?" + base64 + "?=",
# and 45 bytes of UTF-8 are 60 characters of base64.
_EW_OVERHEAD = len("=?utf-8?b?") + len("?=")
_EW_MAX_BYTES = 45
# Display names that can go out as they are: atoms separated by single spaces (RFC 5322
# phrase), or anything printable without '"' or '\' as one quoted string. Up to a length
# that keeps the line under 998; anything else (non-ASCII) becomes encoded words.
_PHRASE_RE = re.compile(rf"^{ATOM}(?: {ATOM})*$")
_QUOTABLE_RE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$")
_MAX_PLAIN_NAME = 900
_WORDS_RE = re.compile(r"[ \t]*[^ \t]+")  # a word with the white space before it
_HIGH_BYTES = bytes(range(0x7F, 0x100))
_NOT_HEADER_TEXT_RE = re.compile(r"[^\t\x20-\x7e]")  # in a header line: VCHAR and WSP only


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
    return CRLF.join(lines)


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


def fold_text(name: str, value: str) -> str:
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


def fold_addresses(name: str, mailboxes: list[Mailbox]) -> str:
    tokens: list[str] = []
    for mailbox in mailboxes:
        parts = _mailbox_tokens(mailbox)
        if tokens:
            tokens[-1] += ","
            parts[0] = " " + parts[0]
        tokens.extend(parts)
    return _fold(name, tokens)


def check_head(head: str, names: list[str]) -> None:
    """The header section is exactly the fields that were built, in order, 7-bit, no line
    longer than 998, every other line a continuation with something on it. True by
    construction; checked because a mistake here would be a header injection."""
    lines = head.split(CRLF)
    fields = [line.partition(":")[0] for line in lines if line[:1] not in (" ", "\t")]
    if (
        fields != names
        or _NOT_HEADER_TEXT_RE.search(head.replace(CRLF, ""))
        or any(len(line) > _MAX_WIRE_LINE or not line.strip() for line in lines)
    ):
        raise PermanentError("message header section is malformed; refusing to send")


# -- bodies -----------------------------------------------------------------------------------


def encode_body(text: str) -> tuple[str, bytes]:
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


def single_part(headers: list[tuple[str, str]], subtype: str, encoded: tuple[str, bytes]) -> bytes:
    cte, body = encoded
    headers.extend(_part_headers(subtype, cte))
    headers.append(("MIME-Version", "MIME-Version: 1.0"))
    return body


def multipart_alternative(
    headers: list[tuple[str, str]], encoded: list[tuple[str, tuple[str, bytes]]]
) -> bytes:
    parts = [
        (CRLF.join(line for _, line in _part_headers(subtype, cte)).encode("ascii"), body)
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
