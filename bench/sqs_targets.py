"""The sqs targets of ``python -m bench.sinks``, on moto's SQS server (a subprocess on a free
port, started here, with dummy credentials): ``sqs`` (a standard queue), ``sqs-fifo`` (a FIFO
queue, one message group), and, on request, ``sqs-client`` and ``sqs-fifo-client``:
aiobotocore driven alone, one ``SendMessage`` per intent, what the client and the server do
without the sink."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from typing import Any

from worker.intent import Intent

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "sekrit-aws-key",  # a dummy: moto checks nothing
    "AWS_REGION": "eu-west-1",  # botocore reads AWS_DEFAULT_REGION; the sink falls back
}
REGION = AWS_ENV["AWS_REGION"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_sqs_server(
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """moto's server in a subprocess on 127.0.0.1 (with ``env`` added to its environment):
    (its URL, the process), once it listens."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto's server exited at start ({process.returncode})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("moto's server did not listen within 60 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    """The standard AWS variables pointing at ``endpoint``, restored afterwards."""
    wanted = {**AWS_ENV, "AWS_ENDPOINT_URL_SQS": endpoint}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ClientSink:
    """aiobotocore alone: one SendMessage per intent, nothing checked, SDK defaults."""

    def __init__(self, payload: dict[str, Any], connections: int, prefix: str) -> None:
        self._queue_url = payload["queue_url"]
        self._fifo: dict[str, str] = (
            {"MessageGroupId": payload["group_id"]} if "group_id" in payload else {}
        )
        self._prefix = prefix
        self._connections = connections
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def deliver(self, intent: Intent) -> None:
        if self._client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            config = AioConfig(max_pool_connections=self._connections)
            self._client = await self._stack.enter_async_context(
                get_session().create_client("sqs", region_name=REGION, config=config)
            )
        fifo = self._fifo and {**self._fifo, "MessageDeduplicationId": f"{self._prefix}{intent.id}"}
        await self._client.send_message(
            QueueUrl=self._queue_url, MessageBody=str(intent.id), **(fifo or {})
        )

    async def aclose(self) -> None:
        await self._stack.aclose()


@contextlib.asynccontextmanager
async def sqs_target(kind: str) -> AsyncIterator[Any]:
    from aiobotocore.session import get_session

    from bench.sinks import Target
    from worker.sinks.sqs.sink import SqsSink

    fifo = kind.startswith("sqs-fifo")
    suffix = ".fifo" if fifo else ""
    prefix = f"outbox_bench_{secrets.token_hex(4)}_"
    with moto_sqs_server() as (endpoint, _), aws_env(endpoint):
        async with get_session().create_client("sqs", region_name=REGION) as client:
            # A fresh queue per run, as moto's FIFO dedup check scans the whole queue (and
            # PurgeQueue is allowed once a minute): the payload dict is shared, so it follows.
            payload: dict[str, Any] = {"queue_url": "", "body": {"order": 42}}
            if fifo:
                payload["group_id"] = "bench"
            runs = 0

            async def received() -> int:
                reply = await client.get_queue_attributes(
                    QueueUrl=payload["queue_url"], AttributeNames=["ApproximateNumberOfMessages"]
                )
                return int(reply["Attributes"]["ApproximateNumberOfMessages"])

            async def reset() -> None:
                nonlocal runs
                if payload["queue_url"]:
                    await client.delete_queue(QueueUrl=payload["queue_url"])
                runs += 1
                attributes = {"FifoQueue": "true"} if fifo else {}
                created = await client.create_queue(
                    QueueName=f"{prefix}{runs}{suffix}", Attributes=attributes
                )
                payload["queue_url"] = created["QueueUrl"]

            await reset()
            versions = (
                f"aiobotocore {metadata.version('aiobotocore')}, "
                f"moto {metadata.version('moto')} (server mode)"
            )
            if kind.endswith("-client"):
                yield Target(
                    "sqs",
                    payload,
                    lambda c, prefix: ClientSink(payload, c, prefix),
                    received,
                    reset,
                    f"{versions}: aiobotocore's SendMessage alone",
                )
            else:
                yield Target(
                    "sqs",
                    payload,
                    lambda c, prefix: SqsSink(id_prefix=prefix, concurrency=c),
                    received,
                    reset,
                    versions,
                )
