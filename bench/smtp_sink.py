"""A local SMTP sink for the email scenario: accepts every message, keeps nothing.

Runs in its own process (``python -m bench.smtp_sink [--starttls]``) so that its CPU is not
the worker's. Prints ``PORT [CAFILE]`` (with --starttls it offers STARTTLS with a throwaway
certificate authority, written to CAFILE for the clients), then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


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
        server = await loop.create_server(
            lambda: SMTP(Sink(), hostname="bench-sink", ident="bench-sink", tls_context=context),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        print(port, cafile or "", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # EOF: the parent is done
        server.close()


if __name__ == "__main__":
    asyncio.run(main("--starttls" in sys.argv[1:]))
