"""``EmailSink``: pooled SMTP connections, and SMTP outcomes mapped to transient/permanent."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass

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
from worker.sinks.email.config import SmtpConfig
from worker.sinks.email.message import build_message, parse_address, short_text
from worker.sinks.size import EMAIL_DEFAULT, SizeLimit

log = logging.getLogger("outbox.email")

# ---------------------------------------------------------------------------------------------
# SMTP outcomes -> delivery errors (pure)
# ---------------------------------------------------------------------------------------------


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
            f"{r.recipient}: {r.code} {short_text(r.message, 120)}" for r in exc.recipients
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
        return _by_code(exc.code, f"SMTP {exc.code}{stage}: {short_text(exc.message)}")
    # Disconnects (including one after the final "." before the reply), timeouts, resets:
    # the server may or may not have the message. At-least-once: assume it does not and
    # send again; the fixed Message-ID lets the receiving side spot the duplicate.
    if isinstance(exc, TimeoutError):
        return TransientError("SMTP server did not answer in time")
    if isinstance(exc, SMTPServerDisconnected):
        return TransientError(f"SMTP connection lost: {short_text(exc.message)}")
    if isinstance(exc, SMTPException):
        return TransientError(f"SMTP error: {short_text(exc.message)}")
    return TransientError(f"SMTP connection failed: {type(exc).__name__}: {short_text(str(exc))}")


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

    def __init__(
        self,
        config: SmtpConfig,
        mail_from: str,
        max_connections: int,
        *,
        max_bytes: int | None = None,
    ) -> None:
        if max_connections < 1:
            raise ConfigError("email sink needs max_connections >= 1")
        try:
            parse_address("mail_from", mail_from)
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
        self._size = SizeLimit("email", max_bytes, EMAIL_DEFAULT)
        self._slots = anyio.Semaphore(max_connections)
        self._idle: list[_Conn] = []  # LIFO: the most recently used is the most likely alive
        self._helo: str | None = config.helo
        self._closed = False

    def __repr__(self) -> str:
        return f"EmailSink({self._config.redacted()!r})"

    async def deliver(self, intent: Intent) -> None:
        # Validation and serialization happen before any I/O: a bad payload never reaches
        # the server and never costs a connection. The bytes go to DATA as they are
        # (aiosmtplib only dot-stuffs them; a Message object would be serialized again).
        data, sender, recipients = build_message(intent, self._mail_from)
        async with self._slots:
            conn = await self._checkout()
            try:
                self._check_size(conn.client, len(data))
            except PermanentError:
                self._checkin(conn)  # the connection is fine, the message is too big
                raise
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

    def _check_size(self, client: SMTP, size: int) -> None:
        """Against the SIZE the server announced in its EHLO reply (RFC 1870; 0 or none:
        no announced limit), before MAIL FROM: a message over it is never offered."""
        announced = client.esmtp_extensions.get("size", "").strip()
        limit = int(announced) if announced.isdigit() and int(announced) > 0 else None
        self._size.check("email message", size, limit, "the SMTP server's SIZE")

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
                    why = f"{exc.code} {short_text(exc.message)}"
                elif isinstance(exc, SMTPException):
                    why = short_text(exc.message)
                else:
                    why = f"{type(exc).__name__}: {short_text(str(exc))}"
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
                "; ".join(f"{r.recipient}: {r.code} {short_text(r.message)}" for r in refused),
            )


class _StaleConnection(Exception):
    """A reused connection failed before the server accepted anything."""


async def _quit(client: SMTP) -> None:
    with anyio.move_on_after(_QUIT_TIMEOUT), contextlib.suppress(Exception):
        await client.quit()
    client.close()
