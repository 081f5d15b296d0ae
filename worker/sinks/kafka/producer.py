"""librdkafka's producer driven from the event loop.

``confluent_kafka.Producer`` is synchronous: ``produce`` only queues a record (librdkafka's
own threads batch, send and retry it), and the delivery reports come back through callbacks
run by ``poll`` or ``flush``. The event loop produces a whole batch of records, then kicks the
producer's thread, which calls ``flush``: while a flush runs, librdkafka sends what is queued
at once instead of waiting out ``linger.ms``, so a batch goes out in one request as soon as it
is complete (a batch of 64 was acknowledged in about half the time of ``linger.ms=1`` with a
polling thread, with a third of the broker's CPU of ``linger.ms=0``). The thread serves the
reports (it blocks in C without the GIL meanwhile) and resolves the batch's future through
``call_soon_threadsafe`` once every record has its report: one wake-up of the loop per batch,
not per record. Between batches it polls for client-wide errors.

A report says delivered or why not; its offset is never looked at (after librdkafka's
idempotent producer dropped a duplicate, some reports carry wrong offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from functools import partial
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from worker.errors import ConfigError
from worker.sinks.kafka.record import Record

__all__ = ["Batch", "Client", "ProduceError", "check_config"]

# What a record got: None (delivered), the report's error, or what produce() raised.
ProduceError = KafkaError | BufferError
_Headers = list[tuple[str, str | bytes | None]]  # confluent-kafka's annotation
_PENDING = KafkaError(KafkaError._TIMED_OUT_QUEUE, "no delivery report")


class _DebugLogger:
    """librdkafka's own log lines at debug level: it logs every failed connect, many a
    second while a broker is down; the sink says "down" and "back" once each instead."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def log(self, level: int, fmt: str, *args: Any) -> None:
        self._log.debug(fmt, *args)


class Batch:
    """The delivery reports of one batch of records; ``done`` resolves when all are in.
    ``errors`` is indexed like the batch of intents; only the produced ones are filled."""

    __slots__ = (
        "_client", "_expected", "_loop", "_reported", "done", "errors", "produced_at", "refused",
    )  # fmt: skip

    def __init__(self, size: int, client: Client) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.errors: list[ProduceError | None] = [_PENDING] * size
        self.produced_at = time.monotonic()
        self._reported: list[int] = []
        self._expected = -1  # known once every record was handed to librdkafka
        self.refused: list[int] = []  # produce() refused them at once (a cached topic error)

    def report(self, index: int, err: KafkaError | None, msg: Message) -> None:
        """A delivery report (the producer's thread)."""
        if err is None:
            self._client.last_ok = time.monotonic()
        self.errors[index] = err
        self._reported.append(index)  # atomic; the loop thread may be reading it
        if len(self._reported) == self._expected:
            # RuntimeError: the loop is closed, nobody waits any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._resolve)

    def failed(self, index: int, error: ProduceError) -> None:
        """produce() refused the record (the loop thread): no report will come for it."""
        self.errors[index] = error
        self.refused.append(index)
        self._reported.append(index)

    def produced(self, count: int) -> None:
        """Every record was handed over (the loop thread). Either this thread or the
        producer's thread sees the last report in: both may resolve, neither can miss it."""
        self._expected = count
        if len(self._reported) == count:
            self._resolve()

    def abandon(self, error: KafkaError) -> None:
        """The producer failed fatally: the reports still missing will never come (the poll
        thread)."""
        self.errors = [error if e is _PENDING else e for e in self.errors]
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        self._client.pending.discard(self)
        if not self.done.done():
            self.done.set_result(None)


class Client:
    """One ``confluent_kafka.Producer`` and the thread that flushes and polls it.

    ``fatal`` is set when librdkafka reports a fatal error (the producer can send nothing
    more: it is replaced); ``errors`` holds the client-wide errors (brokers down, failed
    authentication) for the loop to read; ``last_ok`` is when a record was last delivered.
    """

    def __init__(self, config: dict[str, str], log: logging.Logger) -> None:
        self.fatal: KafkaError | None = None
        self.errors: deque[KafkaError] = deque(maxlen=16)
        self.pending: set[Batch] = set()  # batches still waiting for reports
        self.last_ok = 0.0
        self.created_at = time.monotonic()
        self._log = log
        self._producer = Producer(config, error_cb=self._on_error, logger=_DebugLogger(log))
        self._stop = threading.Event()
        self._kick = threading.Event()  # a batch was produced: flush it
        self._thread = threading.Thread(target=self._serve, name="kafka-producer", daemon=True)
        self._thread.start()

    def send(self, records: Iterable[tuple[int, Record]], size: int) -> Batch:
        """Hand each record to librdkafka as soon as ``records`` yields it, in order (the
        loop thread): the first ones are on their way while the rest are being built.
        ``size``: the batch's length, which the indexes are below."""
        batch = Batch(size, self)
        self.pending.add(batch)
        produce = self._producer.produce
        count = 0
        for index, record in records:
            count += 1
            try:
                produce(
                    record.topic,
                    record.value,
                    record.key,
                    headers=cast(_Headers, record.headers),
                    on_delivery=partial(batch.report, index),
                )
            except KafkaException as exc:
                batch.failed(index, exc.args[0])
            except BufferError as exc:  # queue.buffering.max.messages (or .kbytes) is full
                batch.failed(index, exc)
        batch.produced(count)
        if count:
            self._kick.set()
        return batch

    def refresh(self, topics: Iterable[str], timeout: float) -> None:
        """Fetch the topics' metadata anew (blocks: run it in a thread). librdkafka keeps a
        topic's authorization error until its next metadata refresh (5 minutes by default),
        refusing every record to it at once meanwhile, even after the ACL was granted."""
        for topic in topics:
            try:
                self._producer.list_topics(topic, timeout)
            except KafkaException as exc:
                self._log.debug("metadata of %r: %s", topic, exc)

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors (the producer's thread)."""
        if err.fatal():
            self._failed(err)
        self.errors.append(err)
        self._log.debug("librdkafka: %s", err.str())

    def _failed(self, err: KafkaError) -> None:
        """A fatal error: no more reports will be served (every poll raises it)."""
        self.fatal = err
        for batch in list(self.pending):
            batch.abandon(err)

    def _serve(self) -> None:
        producer = self._producer
        while not self._stop.is_set():
            try:
                if self._kick.wait(0.1) or len(producer):
                    self._kick.clear()
                    # Returns once nothing is outstanding, or after a second (a broker
                    # down): then round again, so that a stop is seen.
                    producer.flush(1.0)
                else:
                    producer.poll(0)
            except Exception as exc:  # a fatal error is raised here too: this thread goes on
                self._raised(exc)

    def _raised(self, exc: Exception) -> None:
        # confluent-kafka raises a fatal error from poll/flush, and runs the callbacks after
        # it with the exception still set, so that it may surface as the cause of another.
        seen: BaseException | None = exc
        while seen is not None:
            err = seen.args[0] if isinstance(seen, KafkaException) and seen.args else None
            if isinstance(err, KafkaError) and err.fatal():
                self._failed(err)
                break
            seen = seen.__cause__ or seen.__context__
        self._log.debug("librdkafka: %s", exc)
        self._stop.wait(0.1)  # not a busy loop if it keeps raising

    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds, fail the rest, stop. Blocks:
        run it in a thread."""
        self._stop.set()
        self._kick.set()
        self._thread.join()
        try:
            self._producer.flush(timeout)
            # Whatever is left gets a report (purged) rather than waiting in C for ever.
            self._producer.purge()
            self._producer.flush(0)
            self._producer.close()
        except (KafkaException, RuntimeError) as exc:
            self._log.debug("closing the Kafka producer: %s", exc)


def check_config(config: dict[str, str], log: logging.Logger) -> None:
    """Raise ``ConfigError`` (one line) if librdkafka refuses a property. The producer it
    builds to find out has no brokers, so it connects nowhere. librdkafka's message names
    the property, never its value."""
    # No brokers, no log lines (it would warn about having no brokers).
    checked = {k: v for k, v in config.items() if k != "bootstrap.servers"} | {"log_level": "0"}
    try:
        producer = Producer(checked, logger=_DebugLogger(log))
    except KafkaException as exc:
        raise ConfigError(f"--kafka-config: {exc.args[0].str()}") from None
    producer.close()
