"""The ``sqs`` kind: Amazon SQS (standard and FIFO queues) through aiobotocore.

The payload and the message built from it are in ``worker.sinks.sqs.message``. AWS settings
come from where every AWS tool reads them: the credential chain (environment, profile, SSO,
container or instance role), ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile's region,
and ``AWS_ENDPOINT_URL_SQS``/``AWS_ENDPOINT_URL`` for a local or compatible server.

``deliver_many`` (the ``BatchSink`` protocol) groups the batch by queue and sends each
queue's messages with ``SendMessageBatch``, up to 10 and 1 MiB per request, in order (a FIFO
group's messages keep their order); each entry's own success or failure is that intent's
outcome. Before sending, each message is checked against its queue's ``MaximumMessageSize``
(read with ``GetQueueAttributes``, cached for 5 minutes), so a message that is too large,
or a queue that does not exist, is dead without anything sent.

The SDK's own retries are off: the relay retries with its backoff, counts the attempts and
keeps within the delivery timeout; SDK retries inside one attempt would multiply both (SQS
sends no Retry-After hint to honour). Throttling, a 5xx, a timeout, a network error or bad
credentials are transient; a missing queue, access denied, or a message SQS refuses is dead.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.base import DeliversBatchOfOne, error_text
from worker.sinks.reconnect import ConnectGate
from worker.sinks.size import SizeLimit
from worker.sinks.sqs.message import SqsMessage, build_message, check_id_prefix

__all__ = ["MAX_REQUEST_BYTES", "SqsSink"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1_048_576  # SQS's largest message, and the most one batch may carry
_MAX_ENTRIES = 10  # per SendMessageBatch
_QUEUE_INFO_TTL = 300.0  # seconds a queue's MaximumMessageSize is trusted
# Error codes (Code or QueryErrorCode) after which no retry can succeed.
_QUEUE_GONE = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})
_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "KmsAccessDenied"})
_REFUSED = frozenset(
    {
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidMessageContents",
        "InvalidAttributeName",
        "InvalidAttributeValue",
        "MessageTooLong",
        "UnsupportedOperation",
    }
)
_SDK_RETRIES_OFF = {"total_max_attempts": 1, "mode": "standard"}


# An XML error document answered to a JSON request (moto's server does so for its IAM
# checks): botocore leaves the document in Message, and the HTTP status in Code.
_XML_CODE_RE = re.compile(r"<Code>([\w.]+)</Code>")
_XML_MESSAGE_RE = re.compile(r"<Message>([^<]*)</Message>")


def _codes(exc: ClientError) -> set[str]:
    error = exc.response.get("Error", {})
    codes = {str(error.get("Code", "")), str(error.get("QueryErrorCode", ""))}
    codes.update(_XML_CODE_RE.findall(str(error.get("Message", ""))))
    named = {c for c in codes if c and not c.isdigit()}
    return named or codes - {""}


def _message(exc: ClientError) -> str:
    text = str(exc.response.get("Error", {}).get("Message", ""))
    inner = _XML_MESSAGE_RE.search(text)
    return " ".join((inner.group(1) if inner else text).split())


class SqsSink(DeliversBatchOfOne):
    """One aiobotocore client per worker (a pool of HTTPS connections), made on first use."""

    max_batch: int = _MAX_ENTRIES  # one SendMessageBatch per deliver_many

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        id_prefix: str = "",
        concurrency: int = 64,
        max_bytes: int | None = None,
    ):
        check_id_prefix(id_prefix)
        # Without a region no request can be made, and waiting will not bring one: say so at
        # start-up rather than retry every sqs intent until its attempts run out.
        if not (get_session().get_config_variable("region") or env_region()):
            raise ConfigError(
                "the sqs kind needs an AWS region: set AWS_REGION or AWS_DEFAULT_REGION "
                "(or a region in the AWS profile)"
            )
        self._size = SizeLimit("sqs", max_bytes, MAX_REQUEST_BYTES)
        self._timeout = timeout
        self._id_prefix = id_prefix
        self._config = AioConfig(
            retries=_SDK_RETRIES_OFF,
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            max_pool_connections=max(concurrency, 10),
        )
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._queue_sizes: dict[str, tuple[float, int]] = {}  # url -> (expires, max size)
        # One gate per queue: a look-up that fails is shared by the deliveries waiting for
        # that queue, never by those of another.
        self._gates: dict[str, ConnectGate] = {}
        self._client_lock = anyio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        where = self._client.meta.endpoint_url if self._client is not None else "not connected"
        return f"SqsSink({where})"

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(intents)
        by_queue: dict[str, list[tuple[int, SqsMessage]]] = {}
        for i, intent in enumerate(intents):
            try:
                message = build_message(intent, self._id_prefix)
            except PermanentError as exc:
                results[i] = exc
                continue
            by_queue.setdefault(message.queue_url, []).append((i, message))
        for queue_url, messages in by_queue.items():
            try:
                max_size = await self._max_size(queue_url)
            except (PermanentError, TransientError) as exc:
                for i, _ in messages:
                    results[i] = type(exc)(str(exc))
                continue
            fitting = []
            for i, message in messages:
                try:
                    self._size.check(
                        "sqs message (body and attributes)",
                        message.size,
                        max_size,
                        "the queue's MaximumMessageSize",
                    )
                except PermanentError as exc:
                    results[i] = exc
                else:
                    fitting.append((i, message))
            for chunk in _chunks(fitting):
                for i, error in zip(
                    [i for i, _ in chunk], await self._send(queue_url, chunk), strict=True
                ):
                    results[i] = error
        return results

    async def _send(
        self, queue_url: str, chunk: list[tuple[int, SqsMessage]]
    ) -> list[BaseException | None]:
        """One SendMessageBatch; one outcome per entry. A request refused as a whole for
        something in one entry is sent again entry by entry, so only that one dies."""
        entries = [{"Id": str(n), **message.entry} for n, (_, message) in enumerate(chunk)]
        try:
            client = await self._ready()
            with anyio.fail_after(self._timeout):
                reply = await client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        except Exception as exc:
            error = self._failure(exc, queue_url)
            if len(chunk) > 1 and isinstance(exc, ClientError) and _codes(exc) & _REFUSED:
                return [(await self._send(queue_url, [one]))[0] for one in chunk]
            return [type(error)(str(error)) for _ in chunk]
        outcomes: list[BaseException | None] = [
            TransientError(f"sqs {queue_url}: SendMessageBatch answered nothing for the entry")
            for _ in chunk
        ]
        for ok in reply.get("Successful", []):
            outcomes[int(ok["Id"])] = None
        for failed in reply.get("Failed", []):
            outcomes[int(failed["Id"])] = _entry_failure(failed, queue_url)
        return outcomes

    async def _max_size(self, queue_url: str) -> int:
        """The queue's MaximumMessageSize; a missing queue raises PermanentError."""
        cached = self._queue_sizes.get(queue_url)
        if cached is not None and cached[0] > anyio.current_time():
            return cached[1]
        gate = self._gates.get(queue_url)
        if gate is None:
            gate = self._gates[queue_url] = ConnectGate(f"SQS queue {queue_url}", log)
        async with gate.turn() as turn:  # one look-up per queue at a time; its failure shared
            cached = self._queue_sizes.get(queue_url)
            if cached is not None and cached[0] > anyio.current_time():
                return cached[1]
            size = await turn.connect(lambda: self._look_up(queue_url))
            self._queue_sizes[queue_url] = (anyio.current_time() + _QUEUE_INFO_TTL, size)
            return size

    async def _look_up(self, queue_url: str) -> int:
        try:
            client = await self._ready()
            with anyio.fail_after(self._timeout):
                reply = await client.get_queue_attributes(
                    QueueUrl=queue_url, AttributeNames=["MaximumMessageSize"]
                )
        except ClientError as exc:
            if _codes(exc) & _DENIED:
                # Not allowed to look: SQS itself still refuses what is too large.
                log.warning(
                    "sqs: no sqs:GetQueueAttributes permission on %s; messages are checked "
                    "against SQS's largest size (1 MiB) only",
                    queue_url,
                )
                return MAX_REQUEST_BYTES
            raise self._failure(exc, queue_url) from None
        except Exception as exc:
            raise self._failure(exc, queue_url) from None
        return int(reply.get("Attributes", {}).get("MaximumMessageSize", MAX_REQUEST_BYTES))

    def _failure(self, exc: Exception, queue_url: str) -> TransientError | PermanentError:
        if isinstance(exc, PermanentError | TransientError):
            return exc
        if isinstance(exc, ClientError):
            codes = _codes(exc)
            what = f"{'/'.join(sorted(codes))}: {_message(exc)}"[:300]
            if codes & _QUEUE_GONE:
                return PermanentError(f"sqs queue {queue_url} does not exist")
            if codes & _DENIED:
                return PermanentError(f"sqs access denied to {queue_url} ({what})")
            if codes & _REFUSED:
                return PermanentError(f"sqs refused the message for {queue_url} ({what})")
            return TransientError(f"sqs {queue_url}: {what}")  # throttled, 5xx, credentials
        if isinstance(exc, TimeoutError):
            return TransientError(f"sqs {queue_url}: no answer within {self._timeout:g}s")
        # No connection, no credentials (BotoCoreError, OSError), or anything else: retried.
        return TransientError(f"sqs {queue_url}: {error_text(exc)}")

    async def _ready(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._closed:
                raise TransientError("sqs sink is closed")
            if self._client is None:
                session = get_session()
                # botocore reads AWS_DEFAULT_REGION and the profile; the other AWS SDKs (and
                # ECS, Lambda) also set AWS_REGION: take it when botocore found nothing.
                region = None if session.get_config_variable("region") else env_region()
                try:
                    self._client = await self._stack.enter_async_context(
                        session.create_client("sqs", region_name=region, config=self._config)
                    )
                except BotoCoreError as exc:  # NoRegionError, a bad profile...
                    raise TransientError(f"sqs: cannot make the AWS client: {exc}") from None
                log.info(
                    "sqs client ready (region %s, endpoint %s)",
                    self._client.meta.region_name,
                    self._client.meta.endpoint_url,
                )
            return self._client

    async def aclose(self) -> None:
        async with self._client_lock:
            self._closed = True
            self._client = None
            await self._stack.aclose()


def env_region() -> str | None:
    return os.environ.get("AWS_REGION") or None


def _chunks(messages: list[tuple[int, SqsMessage]]) -> list[list[tuple[int, SqsMessage]]]:
    """Consecutive runs of at most 10 messages and MAX_REQUEST_BYTES, in order."""
    chunks: list[list[tuple[int, SqsMessage]]] = []
    size = 0
    for item in messages:
        if not chunks or len(chunks[-1]) == _MAX_ENTRIES or size + item[1].size > MAX_REQUEST_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item[1].size
    return chunks


def _entry_failure(failed: dict[str, Any], queue_url: str) -> BaseException:
    code = str(failed.get("Code", ""))
    text = " ".join(str(failed.get("Message", "")).split())[:300]
    if failed.get("SenderFault") and code not in ("KmsThrottled", "RequestThrottled"):
        return PermanentError(f"sqs refused the message for {queue_url} ({code}: {text})")
    return TransientError(f"sqs {queue_url}: {code}: {text}")
