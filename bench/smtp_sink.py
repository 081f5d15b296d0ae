"""A local SMTP sink for the email scenario: accepts every message, keeps nothing.

Runs in its own process (``python -m bench.smtp_sink``) so that its CPU is not the worker's;
prints the port it listens on, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname="bench-sink", ident="bench-sink"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # EOF: the parent is done
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
