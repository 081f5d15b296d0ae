"""librdkafka's mock cluster, for what Tansu cannot do: broker errors on demand.

The confluent-kafka wheel bundles librdkafka, which carries its own test facility: a Kafka
cluster in-process, its brokers listening on real 127.0.0.1 ports, with an API to inject an
error into the next requests of a kind. It has no Python binding: this drives it through
ctypes (``rd_kafka_mock_*`` in rdkafka_mock.h). It is not a stable API, so the test extra pins
confluent-kafka's minor version.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager

import confluent_kafka

PRODUCE = 0  # ApiKey of a ProduceRequest
INIT_PRODUCER_ID = 22


def _library() -> ctypes.CDLL:
    """The librdkafka the wheel's extension module is linked with."""
    package = os.path.dirname(confluent_kafka.__file__)
    found = glob.glob(os.path.join(os.path.dirname(package), "confluent_kafka.libs", "librdkafka*"))
    if not found:
        raise RuntimeError("no librdkafka in the confluent-kafka wheel (built from source?)")
    lib = ctypes.CDLL(found[0])
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
    ]  # fmt: skip
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
    ]  # fmt: skip
    lib.rd_kafka_mock_push_request_errors_array.argtypes = [
        ctypes.c_void_p, ctypes.c_int16, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    lib.rd_kafka_mock_clear_request_errors.argtypes = [ctypes.c_void_p, ctypes.c_int16]
    return lib


class MockCluster:
    def __init__(self, lib: ctypes.CDLL, handle: int, cluster: int) -> None:
        self._lib = lib
        self._handle = handle
        self._cluster = cluster
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(cluster).decode()

    @property
    def url(self) -> str:
        return "kafka://" + ",kafka://".join(self.bootstrap.split(","))

    def create_topic(self, name: str, partitions: int = 1, replication: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(
            self._cluster, name.encode(), partitions, replication
        )
        assert err == 0, f"rd_kafka_mock_topic_create: {err}"

    def push_errors(self, api_key: int, *errors: int) -> None:
        """The next ``len(errors)`` requests of ``api_key`` get these errors, in order."""
        array = (ctypes.c_int * len(errors))(*errors)
        self._lib.rd_kafka_mock_push_request_errors_array(
            self._cluster, api_key, len(errors), array
        )

    def clear_errors(self, api_key: int) -> None:
        self._lib.rd_kafka_mock_clear_request_errors(self._cluster, api_key)


@contextmanager
def mock_cluster(brokers: int = 3) -> Iterator[MockCluster]:
    lib = _library()
    conf = lib.rd_kafka_conf_new()
    errstr = ctypes.create_string_buffer(512)
    # Quiet: it has no bootstrap.servers of its own, which librdkafka would warn about.
    lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, ctypes.sizeof(errstr))
    # The handle owns the cluster; it never produces anything itself.
    handle = lib.rd_kafka_new(0, conf, errstr, ctypes.sizeof(errstr))
    if not handle:
        raise RuntimeError(f"rd_kafka_new: {errstr.value.decode()}")
    cluster = lib.rd_kafka_mock_cluster_new(handle, brokers)
    try:
        yield MockCluster(lib, handle, cluster)
    finally:
        lib.rd_kafka_mock_cluster_destroy(cluster)
        lib.rd_kafka_destroy(handle)
