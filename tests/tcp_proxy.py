"""A TCP proxy on 127.0.0.1 that tests stop and start, to take "the broker" down and bring
it back without touching the machine's shared RabbitMQ/NATS."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import anyio
import anyio.abc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    def __init__(self, tg: anyio.abc.TaskGroup, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0  # accepted so far
        self._tg = tg
        self._serving: anyio.CancelScope | None = None
        self._stopped = anyio.Event()
        self._links: set[anyio.CancelScope] = set()
        self._replies = anyio.Event()  # set: server -> client bytes flow
        self._replies.set()

    async def start(self) -> None:
        """Listen (again) on the same port."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self._stopped = anyio.Event()
        await self._tg.start(self._serve, listener)

    async def _serve(
        self,
        listener: anyio.abc.SocketListener,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with anyio.CancelScope() as self._serving:
                async with listener:
                    task_status.started()
                    await listener.serve(self._link)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Stop listening and cut every connection: the broker is "down"."""
        if self._serving is not None:
            self._serving.cancel()
            await self._stopped.wait()
            self._serving = None

    def cut(self) -> None:
        """Cut the open connections but keep listening (a network blip)."""
        for scope in list(self._links):
            scope.cancel()

    def hold_replies(self) -> None:
        """Stop forwarding what the server sends (confirms, acks) until ``release_replies``."""
        if self._replies.is_set():
            self._replies = anyio.Event()

    def release_replies(self) -> None:
        self._replies.set()

    async def _link(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        with anyio.CancelScope() as scope:
            self._links.add(scope)
            try:
                async with (
                    client,
                    await anyio.connect_tcp("127.0.0.1", self.target_port) as up,
                    anyio.create_task_group() as tg,
                ):
                    tg.start_soon(self._pump, client, up, False, tg.cancel_scope)
                    tg.start_soon(self._pump, up, client, True, tg.cancel_scope)
            except OSError:
                pass  # the target is down too, or a peer reset: the client sees a close
            finally:
                self._links.discard(scope)

    async def _pump(
        self,
        source: anyio.abc.SocketStream,
        sink: anyio.abc.SocketStream,
        replies: bool,
        link: anyio.CancelScope,
    ) -> None:
        try:
            async for chunk in source:
                if replies:
                    await self._replies.wait()
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        link.cancel()  # one side closed: close both


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(tg, target_port)
        await proxy.start()
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
