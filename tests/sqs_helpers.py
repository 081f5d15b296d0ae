"""A real SQS-compatible server for the sqs tests: moto's server mode, started by the suite as a
subprocess on a free port (bench/sqs_targets.py has the code; moto is a wheel in the test
extra, so it always starts: no skip).

The ``sqs_server`` fixture sets the standard AWS variables for the whole session (dummy
credentials, a region, ``AWS_ENDPOINT_URL_SQS``), so the sink, and any worker subprocess,
find the server the way they would find AWS. ``SqsQueues`` creates queues of the test's own
and reads them back through a client of its own, straight to the server.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiobotocore.session import get_session

from bench.sqs_targets import AWS_ENV, REGION, moto_sqs_server


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[MotoServer]:
    with moto_sqs_server() as (url, process), pytest.MonkeyPatch.context() as env:
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL_SQS": url}.items():
            env.setenv(name, value)
        # Nothing of the machine's own AWS set-up: no profile, no other region or endpoint.
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                     "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):  # fmt: skip
            env.delenv(name, raising=False)
        for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            env.setenv(name, "/nonexistent/outbox-tests")
        yield MotoServer(url, process)


@dataclass
class SqsQueues:
    """Queues of this test's own (``t<random>_NAME``) on the server, and what they hold."""

    client: Any
    prefix: str

    async def create(self, name: str, **attributes: str) -> str:
        if name.endswith(".fifo"):
            attributes["FifoQueue"] = "true"
        reply = await self.client.create_queue(
            QueueName=f"{self.prefix}{name}", Attributes=attributes
        )
        return str(reply["QueueUrl"])

    async def count(self, queue_url: str) -> int:
        """Messages stored and not yet received (received ones are deleted by ``drain``)."""
        reply = await self.client.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages",
                                                "ApproximateNumberOfMessagesDelayed"]
        )  # fmt: skip
        return sum(int(v) for v in reply["Attributes"].values())

    async def drain(self, queue_url: str) -> list[dict[str, Any]]:
        """Every message of the queue, in the order a consumer gets them; deletes them."""
        out: list[dict[str, Any]] = []
        while True:
            reply = await self.client.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=10,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
                VisibilityTimeout=60,
            )
            messages = reply.get("Messages", [])
            if not messages:
                return out
            out.extend(messages)
            await self.client.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ],
            )


@contextlib.asynccontextmanager
async def sqs_queues(server: MotoServer) -> AsyncIterator[SqsQueues]:
    async with get_session().create_client(
        "sqs", endpoint_url=server.url, region_name=REGION
    ) as client:
        queues = SqsQueues(client, f"t{secrets.token_hex(4)}_")
        try:
            yield queues
        finally:
            listed = await client.list_queues(QueueNamePrefix=queues.prefix)
            for url in listed.get("QueueUrls", []):
                await client.delete_queue(QueueUrl=url)


def attribute(message: dict[str, Any], name: str) -> str | None:
    value = message.get("MessageAttributes", {}).get(name)
    return None if value is None else str(value["StringValue"])
