"""A local SMTP sink for the email scenario: accepts every message, keeps nothing.

Runs in its own process (``python -m bench.smtp_sink [--starttls]``) so that its CPU is not
the worker's. Prints ``PORT [CAFILE]`` (with --starttls it offers STARTTLS with a throwaway
certificate authority, written to CAFILE for the clients), then serves until stdin closes.

A few lines of asyncio protocol rather than a full server (aiosmtpd spent ~0.45 ms of CPU
per message, on the same two cores as the worker it was meant to measure): it answers what
a client sends in order, does no address checks and discards the data.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
from pathlib import Path

_END_OF_DATA = b"\r\n.\r\n"


class SinkProtocol(asyncio.Protocol):
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self._tls = tls
        self._buffer = b""
        self._in_data = False
        self._upgrading = False  # between STARTTLS and the TLS transport being ours

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # The TLS layer may hand over the client's first command before start_tls has
        # returned the new transport to us: keep it until then.
        while self._buffer and not self._upgrading:
            if self._in_data:
                # The terminator is CRLF . CRLF; the message may also be empty (". CRLF").
                if self._buffer.startswith(b".\r\n"):
                    end, skip = 0, 3
                else:
                    end = self._buffer.find(_END_OF_DATA)
                    if end < 0:
                        return
                    skip = len(_END_OF_DATA)
                self._buffer = self._buffer[end + skip :]
                self._in_data = False
                self._transport.write(b"250 OK\r\n")
                continue
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return
            self._buffer = rest
            if not self._command(line[:4].upper()):
                return

    def _command(self, verb: bytes) -> bool:
        """Answer one command; False when the connection is done or being upgraded."""
        write = self._transport.write
        if verb in (b"EHLO", b"HELO"):
            tls = b"250-STARTTLS\r\n" if self._tls is not None else b""
            write(b"250-bench-sink\r\n250-8BITMIME\r\n" + tls + b"250 SIZE 33554432\r\n")
        elif verb == b"DATA":
            self._in_data = True
            write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            write(b"221 bye\r\n")
            self._transport.close()
            return False
        elif verb == b"STAR" and self._tls is not None:
            # Until start_tls takes the transport over, the client's handshake must stay in
            # the socket, not reach data_received as if it were SMTP.
            self._transport.pause_reading()
            self._upgrading = True
            write(b"220 ready for TLS\r\n")
            asyncio.get_running_loop().create_task(self._start_tls())
            return False
        else:  # MAIL, RCPT, RSET, NOOP, ...
            write(b"250 OK\r\n")
        return True

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._tls is not None
        try:
            transport = await loop.start_tls(self._transport, self, self._tls, server_side=True)
        except (OSError, ssl.SSLError):
            self._transport.close()
            return
        assert transport is not None
        self._transport, self._tls, self._upgrading = transport, None, False
        self.data_received(b"")


def _tls_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    import trustme

    ca = trustme.CA()
    cafile = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context, cafile


async def main(starttls: bool) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as directory:
        context, cafile = _tls_context(Path(directory)) if starttls else (None, None)
        server = await loop.create_server(lambda: SinkProtocol(context), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(port, cafile or "", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # EOF: the parent is done
        server.close()


if __name__ == "__main__":
    asyncio.run(main("--starttls" in sys.argv[1:]))
