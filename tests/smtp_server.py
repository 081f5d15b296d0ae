"""A scriptable SMTP server for tests, running on the test's own asyncio event loop.

Usage::

    async with SmtpTestServer(starttls=True, auth=("user", "secret")) as server:
        server.script(Script(data=reply(451)), Script(data=DROP))  # next two transactions
        ...deliver...
        await server.wait_for_messages(1, accepted=True)
        [msg] = server.accepted
        assert msg.rcpt_tos == ("a@example.com",) and msg.message["Subject"] == "hi"

Every transaction (one MAIL FROM up to its DATA reply) takes the next queued ``Script``,
or ``default_script`` when the queue is empty. A ``Step`` says what to do at MAIL, RCPT
(one step for all recipients, or a mapping per address) or DATA: wait ``delay`` seconds,
then reply normally, reply ``reply`` (e.g. "451 4.3.0 Try later"; a 421 also closes the
connection, as real servers do), ``drop`` the connection without replying, or ``stall``
(never reply; the connection stays open until the client leaves or the server stops).

Waiting is event-driven: ``wait_until(predicate)`` wakes on every recorded event and
raises ``TimeoutError`` (with what it saw) after its deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import shutil
import ssl
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "DROP",
    "STALL",
    "AuthAttempt",
    "ReceivedMessage",
    "Script",
    "SmtpTestServer",
    "Step",
    "reply",
]


@dataclass(frozen=True)
class Step:
    """The server's behaviour at one point of a transaction."""

    reply: str | None = None  # full reply line; None = the normal 250
    delay: float = 0.0  # seconds before acting
    drop: bool = False  # close the connection instead of replying
    stall: bool = False  # never reply


def reply(code: int, text: str | None = None, *, delay: float = 0.0) -> Step:
    """A step that answers ``code`` (with a generic text unless given)."""
    return Step(
        reply=f"{code} {text or _DEFAULT_TEXT.get(code // 100, 'Scripted reply')}", delay=delay
    )


_DEFAULT_TEXT = {2: "OK", 4: "4.3.0 Try again later (scripted)", 5: "5.7.1 Rejected (scripted)"}
ACCEPT = Step()
DROP = Step(drop=True)
STALL = Step(stall=True)


@dataclass(frozen=True)
class Script:
    """Behaviour for one transaction. Addresses missing from a ``rcpt`` mapping are accepted."""

    mail: Step = ACCEPT
    rcpt: Step | Mapping[str, Step] = ACCEPT
    data: Step = ACCEPT

    def rcpt_step(self, address: str) -> Step:
        if isinstance(self.rcpt, Step):
            return self.rcpt
        return self.rcpt.get(address) or self.rcpt.get(address.lower()) or ACCEPT


@dataclass(frozen=True)
class ReceivedMessage:
    """A message whose content reached the end of DATA, whatever the server then did."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # as received, dot-unstuffed, CRLF line ends
    connection: int  # server-side connection number, from 1
    tls: bool
    auth_user: str | None
    reply: str | None  # None when the connection was dropped or stalled instead

    @property
    def accepted(self) -> bool:
        return self.reply is not None and self.reply.startswith("2")

    @property
    def message(self) -> EmailMessage:
        return cast(EmailMessage, email.message_from_bytes(self.data, policy=email.policy.default))

    @property
    def header_names(self) -> list[str]:
        return list(self.message.keys())


@dataclass(frozen=True)
class AuthAttempt:
    connection: int
    mechanism: str
    tls: bool


class _Session(Session):
    """aiosmtpd sets ``login_data`` itself after AUTH, then logs that it is deprecated."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _Protocol(SMTP):
    """aiosmtpd's protocol plus a connection number and AUTH bookkeeping."""

    def __init__(self, owner: SmtpTestServer, number: int, **kwargs: Any) -> None:
        super().__init__(owner._handler, **kwargs)
        self.owner = owner
        self.number = number
        self.script: Script | None = None

    def _create_session(self) -> Session:
        return _Session(self.loop)

    @property
    def tls_active(self) -> bool:
        transport = self.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    async def smtp_AUTH(self, arg: str) -> None:
        # Recorded before aiosmtpd decides anything, so that "the client never tried AUTH"
        # can be asserted even when the server would have refused it.
        mechanism = (arg or "").split(" ", 1)[0].upper()
        self.owner.auth_attempts.append(AuthAttempt(self.number, mechanism, self.tls_active))
        self.owner._changed()
        await super().smtp_AUTH(arg)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.owner._protocols.discard(self)
        self.owner._changed()


class _Handler:
    def __init__(self, owner: SmtpTestServer) -> None:
        self.owner = owner

    async def handle_MAIL(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        owner = self.owner
        owner.transactions += 1
        server.script = owner._queue.popleft() if owner._queue else owner.default_script
        owner._changed()
        status = await owner._perform(server, server.script.mail, "250 OK")
        if status.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return status

    async def handle_RCPT(
        self,
        server: _Protocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        script = server.script or self.owner.default_script
        status = await self.owner._perform(server, script.rcpt_step(address), "250 OK")
        if status.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return status

    async def handle_DATA(self, server: _Protocol, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        script = server.script or owner.default_script
        server.script = None
        step = script.data
        auth = session.auth_data
        record = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            connection=server.number,
            tls=server.tls_active,
            auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            reply=None,
        )
        if step.drop or step.stall:
            owner.messages.append(record)  # the content arrived; the reply never will
            owner._changed()
        status = await owner._perform(server, step, "250 OK")
        # Recorded before the reply is written, so a waiter may see it a moment early.
        owner.messages.append(_replace_reply(record, status))
        owner._changed()
        return status

    async def handle_RSET(self, server: _Protocol, session: Session, envelope: Envelope) -> str:
        server.script = None
        return "250 OK"


def _replace_reply(record: ReceivedMessage, status: str) -> ReceivedMessage:
    return dataclasses.replace(record, reply=status)


@dataclass
class _Tls:
    ca: trustme.CA
    cafile: str
    server_context: ssl.SSLContext


class SmtpTestServer:
    """In-process SMTP server on 127.0.0.1 and a free port; an async context manager.

    ``starttls``: offer STARTTLS with a certificate for 127.0.0.1/localhost from a trustme CA
    (``ca``, and ``cafile`` a PEM path for clients). ``implicit_tls``: TLS from the first byte
    (smtps). ``require_starttls``: refuse mail commands before STARTTLS. ``auth``: a
    (user, password) pair the server accepts with PLAIN and LOGIN; then mail needs AUTH unless
    ``auth_required=False``. ``auth_require_tls=False`` advertises and accepts AUTH on a
    plaintext connection (to test clients that must refuse to use it). ``size_limit``: the
    SIZE announced in the EHLO reply, and enforced at DATA (aiosmtpd's default: 32 MiB).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        starttls: bool = False,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth: tuple[str, str] | None = None,
        auth_required: bool | None = None,
        auth_require_tls: bool = True,
        ca: trustme.CA | None = None,
        default_script: Script | None = None,
        size_limit: int | None = None,
    ) -> None:
        if starttls and implicit_tls:
            raise ValueError("starttls and implicit_tls are exclusive")
        self._starttls = starttls
        self._implicit_tls = implicit_tls
        self._require_starttls = require_starttls
        self._auth = auth
        self._auth_required = auth is not None if auth_required is None else auth_required
        # Implicit TLS encrypts everything, but aiosmtpd only knows about STARTTLS.
        self._auth_require_tls = auth_require_tls and not implicit_tls
        self._ca = ca
        self.default_script = default_script or Script()
        self._size_limit = size_limit  # SIZE in the EHLO reply; None: aiosmtpd's 32 MiB

        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.connections = 0
        self.transactions = 0  # MAIL FROM commands seen

        self._queue: deque[Script] = deque()
        self._handler = _Handler(self)
        self._protocols: set[_Protocol] = set()
        self._event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tls: _Tls | None = None
        self._tmpdir: str | None = None

    # -- scripting and inspection ---------------------------------------------------------

    def script(self, *scripts: Script) -> None:
        """Queue behaviour for the next transactions, in order."""
        self._queue.extend(scripts)

    @property
    def accepted(self) -> list[ReceivedMessage]:
        return [m for m in self.messages if m.accepted]

    @property
    def open_connections(self) -> int:
        return len(self._protocols)

    @property
    def ca(self) -> trustme.CA:
        if self._tls is None:
            raise RuntimeError("server has no TLS")
        return self._tls.ca

    @property
    def cafile(self) -> str:
        if self._tls is None:
            raise RuntimeError("server has no TLS")
        return self._tls.cafile

    def url(self, *, user: str | None = None, password: str | None = None, **params: str) -> str:
        scheme = "smtps" if self._implicit_tls else "smtp"
        userinfo = ""
        if user is not None:
            userinfo = (
                quote(user, safe="")
                + (":" + quote(password, safe="") if password is not None else "")
                + "@"
            )
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
        return f"{scheme}://{userinfo}{self.host}:{self.port}" + (f"?{query}" if query else "")

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Return once ``predicate()`` is true; re-checked after every server event."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise TimeoutError(
                f"SMTP test server: no {what} within {timeout}s "
                f"(connections={self.connections}, transactions={self.transactions}, "
                f"messages={len(self.messages)}, accepted={len(self.accepted)})"
            ) from None

    async def wait_for_messages(
        self, count: int, *, accepted: bool = False, timeout: float = 10.0
    ) -> list[ReceivedMessage]:
        """Wait until ``count`` messages arrived (only accepted ones if ``accepted``)."""

        def pick() -> list[ReceivedMessage]:
            return self.accepted if accepted else self.messages

        await self.wait_until(
            lambda: len(pick()) >= count, timeout=timeout, what=f"{count} messages"
        )
        return pick()

    def _changed(self) -> None:
        self._event.set()

    async def _perform(self, proto: _Protocol, step: Step, ok: str) -> str:
        if step.delay:
            await asyncio.sleep(step.delay)  # simulated server latency, not synchronisation
        if step.drop and proto.transport is not None:
            proto.transport.abort()
        if step.drop or step.stall:
            # Cancelled by aiosmtpd when the connection goes (client leaves, drop, or stop).
            await asyncio.get_running_loop().create_future()
        status = step.reply or ok
        if status.startswith("421") and proto.transport is not None:
            # 421 means "closing the channel" (RFC 5321 3.8): close once the reply is out.
            # aiosmtpd writes the reply before this callback can run; close() flushes it.
            asyncio.get_running_loop().call_soon(proto.transport.close)
        return status

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._starttls or self._implicit_tls:
            self._tls = self._make_tls()

        def factory() -> _Protocol:
            self.connections += 1
            self._changed()
            kwargs: dict[str, Any] = {
                "hostname": "smtp.test",
                "ident": "outbox-worker test SMTP",
                "loop": loop,
                "tls_context": self._tls.server_context if self._tls and self._starttls else None,
                "require_starttls": self._require_starttls,
                "auth_required": self._auth_required,
                "auth_require_tls": self._auth_require_tls,
                "authenticator": self._authenticate,
            }
            if self._size_limit is not None:
                kwargs["data_size_limit"] = self._size_limit
            with warnings.catch_warnings():
                # aiosmtpd warns about AUTH without TLS, which some tests set up on purpose.
                warnings.simplefilter("ignore")
                proto = _Protocol(self, self.connections, **kwargs)
            self._protocols.add(proto)
            return proto

        self._server = await loop.create_server(
            factory,
            host=self.host,
            port=0,
            ssl=self._tls.server_context if self._tls and self._implicit_tls else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            protocols = list(self._protocols)
            tasks = [
                t for p in protocols if (t := getattr(p, "_handler_coroutine", None)) is not None
            ]
            for proto in protocols:
                if proto.transport is not None:
                    proto.transport.abort()
            # Cancel rather than wait: a connection whose TLS handshake failed can leave
            # aiosmtpd waiting for a handshake that will never finish.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def __aenter__(self) -> SmtpTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _make_tls(self) -> _Tls:
        ca = self._ca or trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._tmpdir = tempfile.mkdtemp(prefix="smtp-test-ca-")
        cafile = Path(self._tmpdir, "ca.pem")
        ca.cert_pem.write_to_path(str(cafile))
        return _Tls(ca=ca, cafile=str(cafile), server_context=context)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            self._auth is not None
            and isinstance(auth_data, LoginPassword)
            and auth_data.login == self._auth[0].encode()
            and auth_data.password == self._auth[1].encode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
