"""The ``kafka`` kind: records produced by librdkafka's idempotent producer (acks=all), an
intent ``sent`` once its record's delivery report says the cluster stored it.

The payload is a record (``{"topic", "key", "value", "headers"}``) or a Debezium outbox row
(``{"aggregatetype", "aggregateid", "type", "payload", "id"}``), mapped in record.py. Keys go
to Java's partition (murmur2), so a key's records share a partition with those Java producers
and Debezium wrote; the relay hands the sink one intent per ordering key at a time, and the
idempotent producer keeps a batch's records of one partition in order through its retries.

Outcomes:

* a record over ``message.max.bytes`` (or ``--limits kafka:max_bytes``): dead, with both
  sizes, before anything is sent; one the broker refuses as too large: dead;
* an unknown topic (this worker never creates one): retried with a reason naming it, dead
  after the intent's attempts; authorization refused: dead;
* no acknowledgement in time, brokers down or hung: transient, and one "down" line, then one
  "back" line, per outage; the records are never lost (at worst sent twice, with the same
  ``outbox-message-id`` header);
* a producer in a fatal state, or one that has delivered nothing since a record timed out
  (after a broker lost its state, librdkafka can keep failing where a new producer works at
  once), is replaced by a new one.

``deliver_many`` (the ``BatchSink`` protocol) hands a whole batch to librdkafka and waits for
the batch's reports together; every report comes within ``message.timeout.ms``, which the
sink sets below the relay's delivery timeout.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import anyio
from confluent_kafka import KafkaError

from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.base import DeliversBatchOfOne
from worker.sinks.kafka.config import (
    parse_kafka_url,
    producer_config,
)
from worker.sinks.kafka.producer import Batch, Client, ProduceError, check_config
from worker.sinks.kafka.record import DEBEZIUM_TOPIC, KeyEncoding, Record, Router
from worker.sinks.size import SizeLimit, format_bytes
from worker.units import fmt_duration

__all__ = ["KafkaSink"]

log = logging.getLogger(__name__)

E = KafkaError
_TOO_LARGE = frozenset({E.MSG_SIZE_TOO_LARGE, E.INVALID_MSG_SIZE})
_NO_TOPIC = frozenset({E.UNKNOWN_TOPIC_OR_PART, E._UNKNOWN_TOPIC, E._UNKNOWN_PARTITION})
_REFUSED = frozenset(
    {
        E.TOPIC_AUTHORIZATION_FAILED,
        E.CLUSTER_AUTHORIZATION_FAILED,
        E.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)
# The record itself can never be stored (e.g. no key for a compacted topic).
_INVALID = frozenset({E.INVALID_RECORD, E.INVALID_TIMESTAMP, E._INVALID_ARG, E._BAD_MSG})
# The cluster cannot take records now: an outage (one line), the record is retried.
_OUTAGE = frozenset(
    {
        E._MSG_TIMED_OUT, E._TIMED_OUT, E._TRANSPORT, E._ALL_BROKERS_DOWN, E._RESOLVE,
        E._AUTHENTICATION, E.SASL_AUTHENTICATION_FAILED, E.REQUEST_TIMED_OUT,
        E.NETWORK_EXCEPTION, E.BROKER_NOT_AVAILABLE, E.LEADER_NOT_AVAILABLE,
        E.NOT_LEADER_FOR_PARTITION, E.NOT_ENOUGH_REPLICAS, E.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        E.KAFKA_STORAGE_ERROR,
    }
)  # fmt: skip
# The producer dropped the record unsent: it failed fatally, or it was replaced.
_CUT_SHORT = frozenset({E._PURGE_INFLIGHT, E._PURGE_QUEUE, E._DESTROY, E._FATAL})
_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
_CLOSE_TIMEOUT = 5.0  # seconds aclose lets queued records go out


class KafkaSink(DeliversBatchOfOne):
    """One producer per worker, started with it (a bad property stops the start); replaced
    when it can no longer deliver."""

    # A BatchSink: up to this many records per deliver_many (the relay's claims are never
    # bigger than its free slots anyway).
    max_batch: int = 512

    def __init__(
        self,
        url: str,
        *,
        config: Iterable[tuple[str, str]] = (),
        timeout: float = 30.0,
        id_prefix: str = "",
        max_bytes: int | None = None,
        debezium_topic: str = DEBEZIUM_TOPIC,
        key_encoding: KeyEncoding = "string",
    ) -> None:
        entries = list(config)
        brokers = parse_kafka_url(url)
        self._where = ",".join(f"{h}:{p}" for h, p in brokers)
        self._config = producer_config(brokers, entries, timeout=timeout)
        self._timeout = timeout
        self._router = Router(
            id_prefix=id_prefix, debezium_topic=debezium_topic, key_encoding=key_encoding
        )
        self._max_message = int(self._config.get("message.max.bytes", _MESSAGE_MAX_BYTES))
        self._size = SizeLimit("kafka", max_bytes, self._max_message)
        self._limit = self._size.limit(self._max_message)[0]
        within = self._config.get("delivery.timeout.ms", self._config["message.timeout.ms"])
        self._report_within = int(within) / 1000  # seconds: every report comes by then
        check_config(self._config, log)  # a bad property stops the start
        # Started now: it connects and gets its producer id before the first intent comes.
        self._client = Client(self._config, log)
        self._retired: list[threading.Thread] = []
        self._down_since: float | None = None  # time.monotonic() when the outage began
        self._replaced_at = -math.inf  # time.monotonic() of the last new producer
        self._closed = False

    def __repr__(self) -> str:
        return f"KafkaSink({self._where})"

    # --- delivering ---------------------------------------------------------------------

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        """Produce each valid intent's record in order, then wait for all the reports."""
        if self._closed:
            raise TransientError("kafka sink is closed")
        results: list[BaseException | None] = [None] * len(intents)
        sent: list[tuple[int, Record]] = []
        client = self._healthy_client()
        batch = client.send(self._records(intents, results, sent), len(intents))
        await batch.done
        await self._retry_refused(client, batch, dict(sent))
        self._client_errors(client)
        stalled = False
        for i, record in sent:
            err = batch.errors[i]
            if isinstance(err, KafkaError) and err.code() in _CUT_SHORT and client.fatal:
                err = client.fatal  # why: an ACL refusing idempotent writes, say
            results[i] = self._outcome(record, err)
            if isinstance(err, KafkaError) and err.code() == E._MSG_TIMED_OUT:
                stalled = stalled or client.last_ok < batch.produced_at
        if stalled and client is self._client and client.fatal is None:
            # Nothing got through since this batch was handed over: after a broker lost
            # its state, librdkafka's idempotent producer can keep failing (its producer
            # id unknown there) where a new producer works at once.
            self._replace(client, "no record delivered since the last batch timed out")
        return results

    def _records(
        self,
        intents: Sequence[Intent],
        results: list[BaseException | None],
        sent: list[tuple[int, Record]],
    ) -> Iterator[tuple[int, Record]]:
        """Each valid intent's record (into ``sent`` too); the others' errors into
        ``results``. A generator: each record is produced before the next is built."""
        for i, intent in enumerate(intents):
            try:
                record = self._router.record(intent)
                if record.size > self._limit:
                    self._size.check(
                        f"kafka record for topic {record.topic!r}",
                        record.size,
                        self._max_message,
                        "the producer's message.max.bytes",
                    )
            except PermanentError as exc:
                results[i] = exc
                continue
            sent.append((i, record))
            yield i, record

    async def _retry_refused(
        self, client: Client, batch: Batch, records: dict[int, Record]
    ) -> None:
        """Records that produce() refused at once for a topic's cached authorization error:
        the ACL may have been granted since (``retry-dead`` after a fix), so the topics'
        metadata is fetched anew and those records produced once more."""
        again = [
            (i, records[i])
            for i in batch.refused
            if isinstance(err := batch.errors[i], KafkaError) and err.code() in _REFUSED
        ]
        if not again:
            return
        topics = {record.topic for _, record in again}
        await anyio.to_thread.run_sync(client.refresh, topics, self._timeout / 4)
        retried = client.send(iter(again), len(batch.errors))
        await retried.done
        for i, _ in again:
            batch.errors[i] = retried.errors[i]

    def _outcome(self, record: Record, err: ProduceError | None) -> BaseException | None:
        if err is None:
            self._up()
            return None
        if isinstance(err, BufferError):
            return TransientError(f"Kafka {self._where}: the producer's queue is full")
        code = err.code()
        topic = record.topic
        what = f"{err.name()}: {err.str()}"
        if code in _TOO_LARGE:
            limit, source = self._size.limit(self._max_message, "the producer's message.max.bytes")
            return PermanentError(
                f"Kafka refused the record for topic {topic!r} as too large ({what}): "
                f"{format_bytes(record.size)}; the producer's limit is {format_bytes(limit)} "
                f"({source}), the broker's or the topic's (max.message.bytes) is lower"
            )
        if code in _NO_TOPIC:
            return TransientError(
                f"Kafka {self._where}: topic {topic!r} does not exist ({what}); this worker "
                "does not create topics: create it, else the intent ends dead after its attempts"
            )
        if code in _REFUSED:
            return PermanentError(
                f"Kafka refused to let this worker write to topic {topic!r} ({what}): "
                "grant its principal Write (and IdempotentWrite) in the ACLs, then retry-dead"
            )
        if code in _INVALID:
            return PermanentError(f"Kafka refused the record for topic {topic!r}: {what}")
        if err.fatal() or code in _CUT_SHORT:
            return TransientError(
                f"Kafka {self._where}: the producer failed or was replaced before the record "
                f"was sent ({what}); retried"
            )
        if code == E._MSG_TIMED_OUT:
            reason = f"no acknowledgement within {self._report_within:g}s (message.timeout.ms)"
            self._down(reason)
            return TransientError(f"Kafka {self._where}: {reason} (brokers down or hung)")
        if code in _OUTAGE:
            self._down(what)
        return TransientError(f"Kafka {self._where}: {what}")

    # --- the producer's health ----------------------------------------------------------

    def _healthy_client(self) -> Client:
        client = self._client
        if client.fatal is not None:
            client = self._replace(client, f"fatal error: {client.fatal.str()}")
        self._client_errors(client)
        return client

    def _client_errors(self, client: Client) -> None:
        """librdkafka's client-wide errors since the last look: all brokers down is the
        start of an outage (before any record times out)."""
        while client.errors:
            err = client.errors.popleft()
            if err.code() in (E._ALL_BROKERS_DOWN, E._AUTHENTICATION):
                self._down(f"{err.name()}: {err.str()}")

    def _replace(self, client: Client, why: str) -> Client:
        # During an outage its "down" line says enough, and a cause that stays (an ACL that
        # refuses every new producer) is one line a minute, not one per batch.
        now = time.monotonic()
        quiet = self._down_since is not None or now - self._replaced_at < 60
        self._replaced_at = now
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "Kafka %s: %s; starting a new producer",
            self._where,
            why,
        )
        new = self._client = Client(self._config, log)
        # Its undelivered records get their reports (purged: transient) in the background.
        closing = threading.Thread(target=client.close, args=(0.0,), daemon=True)
        closing.start()
        self._retired = [t for t in self._retired if t.is_alive()] + [closing]
        return new

    def _down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "Kafka %s is down (%s); its intents are retried meanwhile", self._where, reason
            )

    def _up(self) -> None:
        if self._down_since is not None:
            down = fmt_duration(time.monotonic() - self._down_since)
            self._down_since = None
            log.warning("Kafka %s is back after %s", self._where, down)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._client.close, _CLOSE_TIMEOUT, abandon_on_cancel=True)
        for closing in self._retired:
            await anyio.to_thread.run_sync(closing.join, _CLOSE_TIMEOUT, abandon_on_cancel=True)
