"""The email sink against a real in-process SMTP server (no mocks)."""

from __future__ import annotations

import asyncio
import email
import email.header
import email.policy
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.smtp_server import DROP, STALL, Script, SmtpTestServer, Step, reply
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.email import EmailSink, SmtpConfig, build_message, parse_smtp_url
from worker.sinks.email import wire as email_wire

SENDER = "Outbox <noreply@sender.test>"
CREATED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
# The EHLO name is fixed so that no test waits for a reverse DNS lookup.
HELO = "client.test"


def intent(payload: Any, id: int = 1) -> Intent:
    return Intent(
        id=id, kind="email", payload=payload, attempts=1, max_attempts=5,
        created_at=CREATED, run_at=CREATED,
    )  # fmt: skip


def simple(**extra: Any) -> dict[str, Any]:
    return {"to": "rcpt@example.com", "subject": "Hello", "text": "Body", **extra}


@asynccontextmanager
async def email_sink(
    server: SmtpTestServer, *, max_connections: int = 2, user: str | None = None,
    password: str | None = None, **params: str,
) -> AsyncIterator[EmailSink]:  # fmt: skip
    config = parse_smtp_url(server.url(user=user, password=password, helo=HELO, **params))
    sink = EmailSink(config, SENDER, max_connections)
    try:
        yield sink
    finally:
        await sink.aclose()


@pytest.fixture
async def server() -> AsyncIterator[SmtpTestServer]:
    async with SmtpTestServer() as srv:
        yield srv


@pytest.fixture
async def sink(server: SmtpTestServer) -> AsyncIterator[EmailSink]:
    async with email_sink(server) as s:
        yield s


# -- delivery ---------------------------------------------------------------------------------


async def test_delivers_headers_and_envelope(server: SmtpTestServer, sink: EmailSink) -> None:
    payload = {
        "to": ["Ann <ann@example.com>", "bob@example.com"],
        "cc": "Carl <carl@example.com>",
        "bcc": ["hidden@example.net"],
        "reply_to": "support@sender.test",
        "subject": "Grüße",
        "text": "plain body",
        "html": "<p>html body</p>",
        "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@sender.test>"},
    }
    await sink.deliver(intent(payload, id=42))

    [got] = await server.wait_for_messages(1, accepted=True)
    assert got.mail_from == "noreply@sender.test"
    assert got.rcpt_tos == (
        "ann@example.com", "bob@example.com", "carl@example.com", "hidden@example.net",
    )  # fmt: skip
    msg = got.message
    assert got.header_names == [
        "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID",
        "X-Campaign", "List-Unsubscribe", "MIME-Version", "Content-Type",
    ]  # fmt: skip
    assert b"hidden@example.net" not in got.data  # Bcc only in the envelope
    assert msg["Message-ID"] == "<outbox-42@sender.test>"
    assert str(msg["From"]) == "Outbox <noreply@sender.test>"
    assert [a.addr_spec for a in msg["To"].addresses] == ["ann@example.com", "bob@example.com"]
    assert msg["Subject"] == "Grüße"
    assert msg["X-Campaign"] == "spring"
    assert msg["Date"].datetime == CREATED
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content().strip() == "plain body"
    assert msg.get_body(("html",)).get_content().strip() == "<p>html body</p>"


async def test_payload_from_sets_envelope_sender_and_message_id_domain(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    await sink.deliver(intent(simple(**{"from": "Billing <billing@Other.Example>"}), id=7))
    [got] = await server.wait_for_messages(1, accepted=True)
    assert got.mail_from == "billing@Other.Example"
    assert got.message["Message-ID"] == "<outbox-7@other.example>"


async def test_html_only_and_duplicate_recipients(server: SmtpTestServer, sink: EmailSink) -> None:
    payload = {"to": ["a@example.com", "A@example.com"], "bcc": "a@example.com",
               "subject": "", "html": "<b>x</b>"}  # fmt: skip
    await sink.deliver(intent(payload))
    [got] = await server.wait_for_messages(1, accepted=True)
    assert got.rcpt_tos == ("a@example.com",)
    assert got.message.get_content_type() == "text/html"


async def test_reuses_one_connection_for_sequential_messages(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    for i in range(5):
        await sink.deliver(intent(simple(), id=i))
    await server.wait_for_messages(5, accepted=True)
    assert server.connections == 1
    assert {m.connection for m in server.messages} == {1}


async def test_concurrent_deliveries_stay_within_max_connections(server: SmtpTestServer) -> None:
    async with email_sink(server, max_connections=3) as sink, asyncio.TaskGroup() as tg:
        for i in range(30):
            tg.create_task(sink.deliver(intent(simple(), id=i)))
    got = await server.wait_for_messages(30, accepted=True)
    assert sorted(m.message["Message-ID"] for m in got) == sorted(
        f"<outbox-{i}@sender.test>" for i in range(30)
    )
    assert server.connections <= 3


async def test_aclose_quits_idle_connections(server: SmtpTestServer) -> None:
    async with email_sink(server) as sink:
        await sink.deliver(intent(simple()))
        assert server.open_connections == 1
    await server.wait_until(lambda: server.open_connections == 0, what="QUIT")
    with pytest.raises(TransientError, match="closed"):
        await sink.deliver(intent(simple()))


# -- error classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "error", "text"),
    [
        (Script(data=reply(451, "4.3.0 Mailbox busy")), TransientError, "451 at DATA: 4.3.0 Mail"),
        (Script(data=reply(554, "5.6.0 Content rejected")), PermanentError, "554 at DATA: 5.6.0"),
        (Script(mail=reply(421)), TransientError, "421 at MAIL FROM"),
        (Script(mail=reply(553, "5.7.1 Sender not allowed")), PermanentError, "553 at MAIL FROM"),
        (Script(rcpt=reply(550, "5.1.1 No such user")), PermanentError, "550 5.1.1 No such user"),
        (Script(rcpt=reply(452, "4.2.2 Mailbox full")), TransientError, "452 4.2.2 Mailbox full"),
    ],
)  # fmt: skip
async def test_reply_codes_are_classified(
    server: SmtpTestServer, sink: EmailSink, script: Script, error: type[Exception], text: str
) -> None:
    server.script(script)
    with pytest.raises(error, match=text):
        await sink.deliver(intent(simple()))
    assert server.accepted == []
    # The connection is discarded after any error; the next delivery works on a new one.
    await sink.deliver(intent(simple(), id=2))
    await server.wait_for_messages(1, accepted=True)
    assert server.connections == 2


async def test_all_recipients_refused_permanent_only_if_all_5xx(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    two = simple(to=["a@example.com", "b@example.com"])
    server.script(Script(rcpt={"a@example.com": reply(550), "b@example.com": reply(550)}))
    with pytest.raises(PermanentError, match="all recipients refused"):
        await sink.deliver(intent(two))
    server.script(Script(rcpt={"a@example.com": reply(550), "b@example.com": reply(450)}))
    with pytest.raises(TransientError, match=r"b@example\.com: 450"):
        await sink.deliver(intent(two))
    assert server.messages == []


async def test_some_recipients_refused_counts_as_sent(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    server.script(Script(rcpt={"bad@example.com": reply(550, "5.1.1 unknown")}))
    await sink.deliver(intent(simple(to=["bad@example.com", "good@example.com"])))
    [got] = await server.wait_for_messages(1, accepted=True)
    assert got.rcpt_tos == ("good@example.com",)


async def test_dropped_after_data_is_transient_and_next_delivery_reconnects(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    server.script(Script(data=DROP))
    with pytest.raises(TransientError, match="connection lost"):
        await sink.deliver(intent(simple(), id=9))
    # The server did get the content: a resend is a duplicate with the same Message-ID.
    [dropped] = server.messages
    assert not dropped.accepted
    await sink.deliver(intent(simple(), id=9))
    await server.wait_for_messages(1, accepted=True)
    assert server.connections == 2
    assert [m.message["Message-ID"] for m in server.messages] == ["<outbox-9@sender.test>"] * 2
    assert server.messages[0].data == server.messages[1].data  # byte-identical resend


@pytest.mark.parametrize("failure", [DROP, reply(421, "4.4.2 Idle timeout")], ids=["drop", "421"])
async def test_stale_pooled_connection_is_retried_once_on_a_new_one(
    server: SmtpTestServer, sink: EmailSink, failure: Step
) -> None:
    await sink.deliver(intent(simple(), id=1))
    # The pooled connection dies at MAIL (as after a server-side idle timeout): nothing was
    # accepted, so the sink reconnects and the intent is delivered in the same call.
    server.script(Script(mail=failure))
    await sink.deliver(intent(simple(), id=2))
    await server.wait_for_messages(2, accepted=True)
    assert server.connections == 2
    # But a fresh connection failing the same way is an error, not a loop.
    server.script(Script(mail=DROP), Script(mail=DROP))
    with pytest.raises(TransientError):
        await sink.deliver(intent(simple(), id=3))
    assert server.connections == 3


async def test_stalled_server_times_out_as_transient(server: SmtpTestServer) -> None:
    async with email_sink(server, timeout="1") as sink:
        server.script(Script(data=STALL))
        with pytest.raises(TransientError, match="did not answer in time"):
            await sink.deliver(intent(simple()))
        [stalled] = server.messages  # the content arrived; the reply never came
        assert not stalled.accepted
        # The client gave up on that connection instead of putting it back in the pool.
        await server.wait_until(lambda: server.open_connections == 0, what="client close")


async def test_wait_for_messages_has_a_deadline(server: SmtpTestServer) -> None:
    with pytest.raises(TimeoutError, match="no 1 messages within"):
        await server.wait_for_messages(1, timeout=0.05)


async def test_connection_refused_is_transient() -> None:
    async with SmtpTestServer() as srv:
        url = srv.url()  # no helo=: the sink looks up this machine's name (off the loop)
    sink = EmailSink(parse_smtp_url(url), SENDER, 1)  # the port is closed now
    with pytest.raises(TransientError, match=r"connect to 127\.0\.0\.1"):
        await sink.deliver(intent(simple()))
    await sink.aclose()


# -- validation: nothing invalid reaches the server -------------------------------------------

INVALID = {
    "not an object": ["to@example.com"],
    "string payload": "hello",
    "null payload": None,
    "missing to": {"subject": "s", "text": "t"},
    "empty to": simple(to=""),
    "empty to list": simple(to=[]),
    "to not str": simple(to=["a@example.com", 5]),
    "to object": simple(to={"email": "a@example.com"}),
    "no at": simple(to="example.com"),
    "two ats": simple(to="a@b@example.com"),
    "space in address": simple(to="a b@example.com"),
    "comma list in one string": simple(to="a@example.com, b@example.com"),
    "bad domain": simple(to="a@-example.com"),
    "bad bcc": simple(bcc="nope"),
    "bad from": simple(**{"from": "nobody"}),
    "non-ascii address": simple(to="jörg@example.com"),
    "unknown field": simple(attachments=[]),
    "subject missing": {"to": "a@example.com", "text": "t"},
    "subject not str": simple(subject=3),
    "no body": {"to": "a@example.com", "subject": "s"},
    "text not str": simple(text=["x"]),
    "html not str": simple(html=1),
    "nul in body": simple(text="a\x00b"),
    "headers not object": simple(headers=[["X-A", "1"]]),
    "header value not str": simple(headers={"X-A": 1}),
    "crlf in subject": simple(subject="Hi\r\nBcc: evil@evil.test"),
    "lf in subject": simple(subject="Hi\nX-Evil: 1"),
    "cr in subject": simple(subject="Hi\rX-Evil: 1"),
    "nul in subject": simple(subject="Hi\x00"),
    "unicode line separator in subject": simple(subject="Hi\u2028X-Evil: 1"),
    "trailing newline in subject": simple(subject="Hi\n"),
    "encoded newline in subject": simple(subject="=?utf-8?q?Hi=0D=0ABcc:_evil@evil.test?="),
    "crlf in header value": simple(headers={"X-A": "1\r\nBcc: evil@evil.test"}),
    "encoded word in header value": simple(headers={"X-A": "=?utf-8?b?DQpCY2M6IGV2aWw=?="}),
    "crlf in header name": simple(headers={"X-A\r\nBcc": "evil@evil.test"}),
    "colon in header name": simple(headers={"X-A: 1\r\nX-B": "2"}),
    "space in header name": simple(headers={"X A": "1"}),
    "empty header name": simple(headers={"": "1"}),
    "non-ascii header name": simple(headers={"X-Ä": "1"}),
    "owned Message-ID": simple(headers={"Message-ID": "<x@y>"}),
    "owned From": simple(headers={"From": "evil@evil.test"}),
    "owned To": simple(headers={"to": "evil@evil.test"}),
    "owned Bcc": simple(headers={"BCC": "evil@evil.test"}),
    "owned Content-Type": simple(headers={"Content-Type": "text/evil"}),
    "owned Resent-To": simple(headers={"Resent-To": "evil@evil.test"}),
    "duplicate header": simple(headers={"X-A": "1", "x-a": "2"}),
    "crlf in display name": simple(to="Ann\r\nBcc: evil@evil.test <ann@example.com>"),
    "encoded word in display name": simple(to="=?utf-8?q?A=0D=0A?= <ann@example.com>"),
    "encoded word in address": simple(cc="=?x?q?y?=@example.com"),
    "bracket in display name": simple(to="Ann <evil@evil.test> <ann@example.com>"),
    "too many recipients": simple(to=[f"r{i}@example.com" for i in range(101)]),
}


@pytest.mark.parametrize("payload", list(INVALID.values()), ids=list(INVALID))
async def test_invalid_payload_is_permanent_and_never_sent(
    server: SmtpTestServer, sink: EmailSink, payload: Any
) -> None:
    with pytest.raises(PermanentError) as info:
        await sink.deliver(intent(payload))
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    assert server.connections == 0 and server.transactions == 0


@pytest.mark.parametrize(
    "subject", ["2+2=?", "Price?=free", "tab\there", "Ünïcödé ✓", "x" * 900, "  padded  "]
)
def test_harmless_subjects_are_kept(subject: str) -> None:
    data, _, _ = build_message(intent(simple(subject=subject)), SENDER)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert " ".join(str(parsed["Subject"]).split()) == " ".join(subject.split())


def test_build_message_is_deterministic_and_keeps_bcc_out_of_headers() -> None:
    payload = simple(bcc="secret@example.com", cc="c@example.com")
    data, sender, recipients = build_message(intent(payload, id=5), SENDER)
    assert sender == "noreply@sender.test"
    assert recipients == ["rcpt@example.com", "c@example.com", "secret@example.com"]
    assert "Bcc" not in email.message_from_bytes(data, policy=email.policy.default)
    assert data == build_message(intent(payload, id=5), SENDER)[0]
    assert b"secret@example.com" not in data
    assert data.isascii() and b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


# -- header injection, property-based, end to end ---------------------------------------------

# Values must be rejected or arrive harmless; the mix is tilted so that both happen often.
_INJECTIONS = st.sampled_from(
    [
        "\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029",
        "\r\nBcc: evil@evil.test", "\nX-Injected: 1", "\r\n\r\nbody", "\r\n X-Folded: 1",
        "=?utf-8?q?=0D=0ABcc:_evil@evil.test?=", "=?utf-8?b?DQpCY2M6IGV2aWxAZXZpbC50ZXN0?=",
    ]
)  # fmt: skip
_TRICKY = st.sampled_from(
    [
        "=?", "?=", "=?utf-8?q?", "%0D%0A", "\\r\\n", ":", ";", ",", '"', "<", ">", "@", "(",
        ")", "\\", "Bcc: evil@evil.test", "evil@evil.test", " ", "  ", "\t", "é", "😀", "x" * 80,
    ]
)  # fmt: skip
_PRINTABLE = st.text(st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=8)
_VALUES = st.lists(
    st.one_of(_PRINTABLE, _TRICKY, _TRICKY, st.text(max_size=4), _INJECTIONS), max_size=5
).map("".join)

EXPECTED_HEADERS = [
    "From", "To", "Subject", "Date", "Message-ID", "X-Custom",
    "Content-Type", "Content-Transfer-Encoding", "MIME-Version",
]  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,  # a loaded CI machine must not turn slowness into failures
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one server on purpose
)
@given(where=st.sampled_from(["subject", "custom", "name"]), value=_VALUES)
async def test_header_values_never_add_headers_or_recipients(
    server: SmtpTestServer, sink: EmailSink, where: str, value: str
) -> None:
    values = {"subject": "Hello", "custom": "x", "name": "Ann", where: value}
    payload = simple(
        subject=values["subject"],
        to=f"{values['name']} <to@example.com>",
        headers={"X-Custom": values["custom"]},
    )
    before, transactions = len(server.messages), server.transactions
    try:
        await sink.deliver(intent(payload))
    except PermanentError:
        event("rejected")
        assert server.transactions == transactions  # rejected before anything was sent
        return
    event("delivered")
    [got] = (await server.wait_for_messages(before + 1, accepted=True))[before:]
    assert got.rcpt_tos == ("to@example.com",)
    assert got.header_names == EXPECTED_HEADERS
    assert [a.addr_spec for a in got.message["To"].addresses] == ["to@example.com"]
    assert "evil" not in got.message.get_content()


@settings(max_examples=400, deadline=None)
@given(subject=_VALUES, custom=_VALUES, name=_VALUES)
def test_built_bytes_parse_back_to_the_validated_headers(
    subject: str, custom: str, name: str
) -> None:
    """The same property without the network, over all three fields at once."""
    payload = simple(subject=subject, to=f"{name} <to@example.com>", headers={"X-Custom": custom})
    try:
        data, _, recipients = build_message(intent(payload), SENDER)
    except PermanentError:
        return
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert recipients == ["to@example.com"]
    assert list(parsed.keys()) == EXPECTED_HEADERS
    assert [a.addr_spec for a in parsed["To"].addresses] == ["to@example.com"]


# -- direct construction: the bytes parse back to exactly the validated fields ----------------

# Tricky but acceptable pieces most of the time (so that most examples get built), with
# the injection attempts of _VALUES mixed in.
_ACCEPTABLE = st.lists(st.one_of(_PRINTABLE, _TRICKY), max_size=6).map("".join)
_NAMES = st.one_of(
    st.sampled_from(["", "Ann", "Ann Smith", "John Q. Public", "Müller, Jörg", "a  b", "\tx",
                     "(c) x", "x" * 75, "ü" * 40, "😀 tag", "Ann (x), Jr.; y: z@w", '"Q"']),
    _ACCEPTABLE.map(lambda name: re.sub(r'["\\<>]|=\?', "", name)),  # what a name may hold
    _ACCEPTABLE, _VALUES,
)  # fmt: skip
_TEXTS = st.one_of(
    _ACCEPTABLE, _ACCEPTABLE, _VALUES, st.text(max_size=300),
    st.sampled_from(["", "x" * 200, "ä" * 120, "a b " * 60, "x" * 998]),
)  # fmt: skip
_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _dedup(specs: list[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for spec in specs:
        if spec.lower() not in seen:
            seen.add(spec.lower())
            result.append(spec)
    return result


def _display_name(field: str) -> str:
    """What parse_address keeps of a display name: stripped, outer quotes removed."""
    name = field.strip()
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


def _header_fields(data: bytes) -> dict[bytes, list[bytes]]:
    """Header name -> the physical lines of that field (first line and continuations)."""
    fields: list[list[bytes]] = []
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line[:1] in b" \t":
            fields[-1].append(line)
        else:
            fields.append([line])
    return {f[0].split(b":", 1)[0]: f for f in fields}


@settings(max_examples=600, deadline=None)
@given(
    subject=_TEXTS, custom=_TEXTS, names=st.lists(_NAMES, min_size=4, max_size=4),
    header=st.sampled_from(["X-Custom", "List-Unsubscribe", "X-" + "a" * 74]),
    text=st.one_of(st.none(), _TEXTS), html=st.one_of(st.none(), _TEXTS), n_to=st.integers(1, 12),
)  # fmt: skip
# Found by a fresh CI run: an ASCII display name with a tab inside goes out as an encoded word.
@example(
    subject="", custom="", names=["", "", "", "0\t0"], header="X-Custom", text=None, html=None,
    n_to=1,
)  # fmt: skip
def test_built_bytes_are_exactly_the_validated_fields(
    subject: str, custom: str, names: list[str], header: str, text: str | None,
    html: str | None, n_to: int,
) -> None:  # fmt: skip
    """Whatever the values hold, two independent parsers (policy.default and compat32) read
    back exactly the fields that were validated, in order, decoded to exactly the input;
    the recipients are exactly To + Cc + Bcc; Bcc appears nowhere in the bytes."""
    text = "" if text is None and html is None else text
    payload: dict[str, Any] = {
        "to": [f"{names[0]} <to{i}@example.com>" for i in range(n_to)],
        "cc": f"{names[1]} <cc@example.com>", "bcc": ["hidden@bcc.example"],
        "reply_to": [f"{names[2]} <reply@example.com>"], "from": f"{names[3]} <me@Sender.Test>",
        "subject": subject, "headers": {header: custom},
        **({"text": text} if text is not None else {}),
        **({"html": html} if html is not None else {}),
    }  # fmt: skip
    try:
        data, sender, recipients = build_message(intent(payload, id=77), SENDER)
    except PermanentError as exc:
        event("rejected: " + " ".join(str(exc).split()[:4]))
        return
    event("built")
    assert sender == "me@Sender.Test"
    assert recipients == _dedup(
        [*(f"to{i}@example.com" for i in range(n_to)), "cc@example.com", "hidden@bcc.example"]
    )
    assert data.isascii() and b"hidden@bcc.example" not in data
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    fields = _header_fields(data)
    assert all(line.strip() and len(line) <= 998 for f in fields.values() for line in f)
    assert all(len(line) <= 78 for line in fields[b"Subject"])

    expected = ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", header]
    if text is not None and html is not None:
        expected += ["MIME-Version", "Content-Type"]
    else:
        expected += ["Content-Type", "Content-Transfer-Encoding", "MIME-Version"]
    assert [f.decode() for f in fields] == expected
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    legacy = email.message_from_bytes(data)  # compat32: a different parser
    assert list(parsed.keys()) == expected and list(legacy.keys()) == expected
    assert all(not parsed[name].defects for name in expected), data

    def check_mailboxes(field: str, name: str, specs: list[str]) -> None:
        expected = _display_name(name)
        got = parsed[field].addresses
        assert [a.addr_spec for a in got] == specs, field
        # Printable ASCII goes out as an atom phrase or a quoted string: read back exactly.
        # A tab inside the name cannot be quoted (qtext has no WSP but space), so such a
        # name is an encoded word too, like non-ASCII.
        if expected.isascii() and "\t" not in expected:
            assert all(a.display_name == expected for a in got), field
            return
        # Encoded words. policy.default collapses white space in a decoded display name and
        # keeps the space between adjacent encoded words (RFC 2047 6.2 drops it; the
        # stdlib's own output reads back the same), so: white space aside there...
        assert all("".join(a.display_name.split()) == "".join(expected.split()) for a in got)
        # ...and exactly with compat32's RFC 2047 decoder.
        decoded = str(email.header.make_header(email.header.decode_header(legacy[field])))
        assert decoded.replace("\r\n", "") == ", ".join(f"{expected} <{s}>" for s in specs)

    check_mailboxes("To", names[0], [f"to{i}@example.com" for i in range(n_to)])
    check_mailboxes("Cc", names[1], ["cc@example.com"])
    check_mailboxes("Reply-To", names[2], ["reply@example.com"])
    check_mailboxes("From", names[3], ["me@Sender.Test"])
    assert parsed["Message-ID"] == "<outbox-77@sender.test>"
    assert parsed["Date"].datetime == CREATED
    for name, value in (("Subject", subject), (header, custom)):
        # Exact, but for the white space right after the colon, which parsers drop.
        assert str(parsed[name]).lstrip(" \t") == value.lstrip(" \t"), name
        decoded = email.header.make_header(email.header.decode_header(legacy[name]))
        assert "".join(str(decoded).split()) == "".join(value.split()), name
    for subtype, source in (("plain", text), ("html", html)):
        if source is not None:
            part = parsed.get_body((subtype,))
            assert part is not None and part.get_content_type() == f"text/{subtype}"
            lines = part.get_payload(decode=True).splitlines()
            assert lines == (source.encode().splitlines() or [b""]), subtype


def test_multipart_is_deterministic_and_its_boundary_avoids_the_content(monkeypatch) -> None:
    payload = simple(html="<p>x</p>")
    assert build_message(intent(payload), SENDER)[0] == build_message(intent(payload), SENDER)[0]

    # A 7bit body that already holds the boundary the content hash gives gets another one.
    class FixedHash:
        def __init__(self, data: bytes) -> None:
            pass

        def hexdigest(self) -> str:
            return "0" * 64

    monkeypatch.setattr(email_wire, "hashlib", SimpleNamespace(sha256=FixedHash))
    taken = "=_outbox_" + "0" * 32
    data, _, _ = build_message(intent(simple(text=f"--{taken}\nBcc: x", html="<p>x</p>")), SENDER)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed.get_boundary() == taken + "_1"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    plain = parsed.get_body(("plain",)).get_content()
    assert plain.replace("\r\n", "\n") == f"--{taken}\nBcc: x\n"


# -- TLS and AUTH -----------------------------------------------------------------------------


async def test_starttls_with_untrusted_certificate_is_refused_before_auth() -> None:
    async with SmtpTestServer(starttls=True, auth=("user", "s3cret")) as srv:
        async with email_sink(srv, user="user", password="s3cret") as sink:
            with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
                await sink.deliver(intent(simple()))
        assert srv.auth_attempts == []
        assert srv.transactions == 0


async def test_starttls_with_trusted_ca_authenticates_and_delivers() -> None:
    async with SmtpTestServer(starttls=True, auth=("user", "p@ss/w:rd")) as srv:
        async with email_sink(srv, user="user", password="p@ss/w:rd", cafile=srv.cafile) as sink:
            await sink.deliver(intent(simple()))
            await sink.deliver(intent(simple(), id=2))
        got = await srv.wait_for_messages(2, accepted=True)
        assert all(m.tls and m.auth_user == "user" for m in got)
        assert [(a.mechanism, a.tls) for a in srv.auth_attempts] == [("PLAIN", True)]
        assert srv.connections == 1


async def test_required_starttls_not_offered_is_refused() -> None:
    async with SmtpTestServer() as srv:
        async with email_sink(srv, tls="starttls") as sink:
            with pytest.raises(TransientError, match="does not offer STARTTLS"):
                await sink.deliver(intent(simple()))
        assert srv.transactions == 0


async def test_opportunistic_without_starttls_sends_in_clear(
    server: SmtpTestServer, sink: EmailSink
) -> None:
    await sink.deliver(intent(simple()))
    [got] = await server.wait_for_messages(1, accepted=True)
    assert not got.tls


async def test_tls_none_skips_offered_starttls() -> None:
    async with SmtpTestServer(starttls=True) as srv:
        async with email_sink(srv, tls="none") as sink:
            await sink.deliver(intent(simple()))
        [got] = await srv.wait_for_messages(1, accepted=True)
        assert not got.tls


async def test_implicit_tls() -> None:
    async with SmtpTestServer(implicit_tls=True, auth=("user", "pw")) as srv:
        assert srv.url().startswith("smtps://")
        async with email_sink(srv, user="user", password="pw", cafile=srv.cafile) as sink:
            await sink.deliver(intent(simple()))
        [got] = await srv.wait_for_messages(1, accepted=True)
        assert got.tls and got.auth_user == "user"


async def test_auth_over_plaintext_is_refused_unless_insecure_auth() -> None:
    async with SmtpTestServer(auth=("user", "pw"), auth_require_tls=False) as srv:
        async with email_sink(srv, user="user", password="pw") as sink:
            with pytest.raises(TransientError, match="unencrypted"):
                await sink.deliver(intent(simple()))
        assert srv.auth_attempts == [] and srv.transactions == 0

        async with email_sink(srv, user="user", password="pw", insecure_auth="1") as sink:
            await sink.deliver(intent(simple()))
        [got] = await srv.wait_for_messages(1, accepted=True)
        assert got.auth_user == "user" and not got.tls
        assert [a.tls for a in srv.auth_attempts] == [False]


async def test_wrong_password_is_transient_and_not_echoed() -> None:
    async with SmtpTestServer(starttls=True, auth=("user", "right")) as srv:
        async with email_sink(srv, user="user", password="wr0ng-pw", cafile=srv.cafile) as sink:
            with pytest.raises(TransientError, match="535") as info:
                await sink.deliver(intent(simple()))
        assert "wr0ng-pw" not in str(info.value)
        assert srv.transactions == 0


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", dict(host="mail.example.com", port=25, tls="opportunistic")),
        ("smtp://mail.example.com?tls=starttls", dict(port=587, tls="starttls")),
        ("smtp://mail.example.com:2525?tls=none", dict(port=2525, tls="none")),
        ("smtps://mail.example.com", dict(port=465, tls="implicit")),
        ("smtp://h?tls=implicit", dict(port=465, tls="implicit")),
        ("SMTP://[::1]:26", dict(host="::1", port=26)),
        ("smtp://u%40x:p%40ss%2Fw%3Ard@h/", dict(username="u@x", password="p@ss/w:rd")),
        ("smtp://u:@h", dict(username="u", password="")),
        ("smtp://h?timeout=2.5&cafile=/etc/ca.pem", dict(timeout=2.5, cafile="/etc/ca.pem")),
        ("smtp://u:p@h?tls=none&insecure_auth=1", dict(insecure_auth=True)),
        ("smtp://h?helo=client.example.org", dict(helo="client.example.org", timeout=30.0)),
    ],
)
def test_parse_smtp_url(url: str, expected: dict[str, Any]) -> None:
    config = parse_smtp_url(url)
    for key, value in expected.items():
        assert getattr(config, key) == value, key


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("http://user:hunter2@h", "smtp:// or smtps://"),
        ("user:hunter2@h", "smtp:// or smtps://"),
        ("smtp://user:hunter2@", "no host"),
        ("smtp://user:hunter2/x@h", "invalid port"),
        ("smtp://user:hunt#er2@h", "'#'"),
        ("smtp://user:hunt?er2@h", "invalid port"),
        ("smtp://user:hunter2@h:99999", "port"),
        ("smtp://user:hunter2@[::1", "cannot be parsed"),
        ("smtp://user:hunter2@h:0", "port"),
        ("smtp://user:hunter2@h/path", "path"),
        ("smtp://user@h", "no password"),
        ("smtp://:hunter2@h", "empty user"),
        ("smtp://user:hunter2@h?tls=hunter2", "tls= must be one of"),
        ("smtp://user:hunter2@h?password=hunter2", "unknown query parameter"),
        ("smtp://user:hunter2@h?tls=none", "in clear"),
        ("smtps://user:hunter2@h?tls=starttls", "implicit"),
        ("smtp://user:hunter2@h?timeout=0", "timeout"),
        ("smtp://user:hunter2@h?timeout=nan", "timeout"),
        ("smtp://user:hunter2@h?timeout=x", "timeout"),
        ("smtp://user:hunter2@h?insecure_auth=maybe", "insecure_auth"),
        ("smtp://user:hunter2@h?tls=none&cafile=/x", "cafile"),
        ("smtp://user:hunter2@h?tls=none&tls=none", "repeats"),
        ("smtp://user:hunter2@h?cafile=", "cafile"),
        ("smtp://user:hunter2@bad_host!", "host"),
        ("smtp://user:hunter2@h?helo=bad%20name", "helo"),
        ("smtp://user:hunter2%0D%0A@h", "control"),
    ],
)
def test_parse_smtp_url_errors_never_show_the_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_smtp_url(url)
    text = str(info.value)
    assert "hunter2" not in text and "hunt" not in text
    assert "\n" not in text
    assert info.value.__cause__ is None


def test_config_repr_and_redacted_hide_the_password() -> None:
    config = parse_smtp_url("smtp://me%40x:hunter2@mail.example.com:587?tls=starttls&timeout=5")
    for text in (repr(config), str(config), config.redacted(), repr([config])):
        assert "hunter2" not in text
    assert config.redacted() == "smtp://me%40x:***@mail.example.com:587?tls=starttls&timeout=5"
    assert parse_smtp_url(config.redacted().replace("***", "hunter2")) == config
    assert config.password == "hunter2"
    sink = EmailSink(config, SENDER, 1)
    assert "hunter2" not in repr(sink)


def test_sink_rejects_bad_configuration() -> None:
    config = SmtpConfig(host="h", port=25)
    with pytest.raises(ConfigError, match="sender"):
        EmailSink(config, "not an address", 1)
    with pytest.raises(ConfigError, match="max_connections"):
        EmailSink(config, SENDER, 0)
    with pytest.raises(ConfigError, match="cafile"):
        EmailSink(SmtpConfig(host="h", port=25, cafile="/nonexistent/ca.pem"), SENDER, 1)
