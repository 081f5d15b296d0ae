"""A counting TCP proxy in front of PostgreSQL: how many queries a client really sends.

Counted on the wire, from the frontend's messages, so nothing in the client has to be
trusted or patched: every simple ``Query`` and every extended-protocol ``Bind`` is one
statement executed. ``Parse`` messages tell which text a prepared statement has, so counts
are kept per query text. Clients must connect with ``sslmode=disable`` (an encrypted stream
cannot be read); the server's replies are passed through untouched.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc

_SPECIAL_REQUESTS = {80877103, 80877104, 80877102}  # SSLRequest, GSSENCRequest, CancelRequest


class QueryCounter:
    def __init__(self) -> None:
        self.by_text: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}  # monotonic send time of each statement

    @property
    def total(self) -> int:
        return sum(self.by_text.values())

    def count(self, text: str) -> None:
        self.by_text[text] += 1
        self.times.setdefault(text, []).append(time.monotonic())

    def reset(self) -> None:
        self.by_text.clear()
        self.times.clear()


class _FrontendParser:
    """Splits one connection's client-to-server byte stream into messages."""

    def __init__(self, counter: QueryCounter) -> None:
        self._counter = counter
        self._buffer = bytearray()
        self._started = False
        self._statements: dict[bytes, str] = {}

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:  # startup-phase messages have no type byte
                if len(self._buffer) < 8:
                    return
                (length,) = struct.unpack("!I", self._buffer[:4])
                if len(self._buffer) < length:
                    return
                (code,) = struct.unpack("!I", self._buffer[4:8])
                del self._buffer[:length]
                self._started = code not in _SPECIAL_REQUESTS
                continue
            if len(self._buffer) < 5:
                return
            kind = bytes(self._buffer[0:1])
            (length,) = struct.unpack("!I", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return
            body = bytes(self._buffer[5 : 1 + length])
            del self._buffer[: 1 + length]
            self._message(kind, body)

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            self._counter.count(_text(body.split(b"\0", 1)[0]))
        elif kind == b"P":
            name, rest = body.split(b"\0", 1)
            self._statements[name] = _text(rest.split(b"\0", 1)[0])
        elif kind == b"B":
            _portal, rest = body.split(b"\0", 1)
            statement = rest.split(b"\0", 1)[0]
            self._counter.count(self._statements.get(statement, "?"))


def _text(sql: bytes) -> str:
    return " ".join(sql.decode(errors="replace").split())


async def _pipe(
    source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, parser: _FrontendParser | None
) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        async for chunk in source:
            if parser is not None:
                parser.feed(chunk)
            await sink.send(chunk)
    with contextlib.suppress(Exception):
        await sink.send_eof()


async def _connect(upstream: tuple[str, int] | str) -> anyio.abc.ByteStream:
    if isinstance(upstream, str):
        return await anyio.connect_unix(upstream)
    return await anyio.connect_tcp(*upstream)


@contextlib.asynccontextmanager
async def counting_proxy(
    upstream: tuple[str, int] | str,
) -> AsyncIterator[tuple[int, QueryCounter]]:
    """Listen on 127.0.0.1 (a free port); yields the port and the live counter."""
    counter = QueryCounter()

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client, await _connect(upstream) as server, anyio.create_task_group() as tg:
            tg.start_soon(_pipe, client, server, _FrontendParser(counter))
            tg.start_soon(_pipe, server, client, None)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield port, counter
        finally:
            tg.cancel_scope.cancel()
    await listener.aclose()


def via_proxy(dsn: str, port: int) -> str:
    """The same DSN (user, password, database, options) pointed at the proxy, without TLS."""
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    params = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port", "sslmode")]
    query = urlencode([*params, ("sslmode", "disable")])
    return urlunsplit((parts.scheme, netloc, parts.path or "/", query, ""))
