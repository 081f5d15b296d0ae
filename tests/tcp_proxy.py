"""A TCP proxy on 127.0.0.1 that a test can stop, freeze, cut or make refuse connections.

Put it between the code under test and a server (PostgreSQL, SMTP, RabbitMQ, NATS), so the
machine's shared server stays up while "the server" fails::

    async with TcpProxy("127.0.0.1", 5432) as proxy:   # or TcpProxy.to_postgres(pg_dsn)
        dsn = proxy.rewrite(pg_dsn)      # same DSN, host:port of the proxy
        proxy.freeze()                   # half-open: sockets stay open, no byte moves
        proxy.heal()                     # bytes held back flow again, as after TCP retransmits
        proxy.hold_replies()             # only server -> client bytes are held (lost acks)
        proxy.release_replies()
        proxy.cut()                      # every connection reset (RST) at once
        proxy.refuse = True              # new connections are accepted, then reset
        await proxy.stop()               # server down: not listening, every connection reset
        await proxy.start()              # server back, on the same port

A frozen proxy also accepts new connections without connecting them upstream: to the
client that looks like a server that never answers, the usual face of a partition.
Runs on the test's own asyncio event loop, like tests/smtp_server.py; every connection
task is owned by the proxy and cancelled by ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["TcpProxy", "free_port"]

_CHUNK = 65536


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.target_path: str | None = None  # a Unix socket instead, see unix()
        self.port = 0  # chosen by the first start(), kept by the next ones
        self.refuse = False
        self.connections = 0  # connections accepted so far, refused ones included
        self.refused = 0
        self._flowing = asyncio.Event()  # clear: frozen, nothing moves
        self._flowing.set()
        self._replies = asyncio.Event()  # clear: server -> client bytes are held
        self._replies.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def unix(cls, path: str) -> TcpProxy:
        """A TCP proxy to a server on a Unix socket."""
        proxy = cls("", 0)
        proxy.target_path = path
        return proxy

    @classmethod
    def to_postgres(cls, dsn: str) -> TcpProxy:
        """A proxy to the server of a PostgreSQL URL, on TCP or on a Unix socket (libpq's
        ``host=/dir``, as the embedded server's DSN has: it listens on no TCP port)."""
        parts = urlsplit(dsn)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        if host.startswith("/"):
            return cls.unix(f"{host}/.s.PGSQL.{port}")  # libpq's name for the socket file
        return cls(host, port)

    # -- faults ---------------------------------------------------------------------------

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def freeze(self) -> None:
        """Stop moving bytes in both directions; keep every socket open."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def hold_replies(self) -> None:
        """Stop forwarding what the server sends (confirms, acks) until ``release_replies``."""
        self._replies.clear()

    def release_replies(self) -> None:
        self._replies.set()

    def cut(self) -> None:
        """Reset every open connection (both sides see the connection die); keep listening."""
        for writer in list(self._writers):
            _abort(writer)

    @property
    def open_connections(self) -> int:
        """Client-side connections currently open (each has an upstream twin once connected)."""
        return len(self._tasks)

    def rewrite(self, url: str) -> str:
        """``url`` with its host:port replaced by the proxy's (user, password, path kept).

        A libpq ``host=``/``port=`` query parameter (a Unix socket) would win over the netloc:
        it is dropped."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, v) for k, v in pairs if k not in ("host", "port")])
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.host}:{self.port}", query=query))

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen: on a free port the first time, (again) on the same port after ``stop()``."""
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and reset every connection: the server is "down"."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- plumbing -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs this callback as its own task; register it so stop() can cancel it.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            if self.refuse:
                self.refused += 1
                _abort(writer)
                return
            self._writers.add(writer)
            await self._flowing.wait()  # a partition swallows the SYN: nothing answers
            try:
                if self.target_path is not None:
                    up_reader, up_writer = await asyncio.open_unix_connection(self.target_path)
                else:
                    up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                _abort(writer)
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, replies=False),
                    self._pipe(up_reader, writer, replies=True),
                )
            finally:
                _abort(up_writer)
                self._writers.discard(up_writer)
        except asyncio.CancelledError:
            pass
        finally:
            _abort(writer)
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                await self._flowing.wait()
                if replies:
                    await self._replies.wait()
                    await self._flowing.wait()  # frozen while the replies were held
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        # One side is gone: take the other down too, as a router forgetting the flow would.
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, so the peer sees a reset like a dead link."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
