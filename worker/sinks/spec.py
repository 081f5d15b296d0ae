"""What a sink says about itself: a ``SinkSpec``, one per sink module, read by the registry
(worker/sinks/registry.py) to build the worker's flags, its sinks and its start-up lines.

Nothing outside a sink's own module names its kind or its options: the flag table,
``Settings``, the start-up targets and the wiring all ask the specs.

Writing your own sink (a "third-party" sink, from another distribution)
---------------------------------------------------------------------------
1. Write the sink: an object with ``async deliver(intent)`` and ``async aclose()``
   (``worker.sinks.base.Sink``). ``deliver`` returns on success and raises
   ``worker.errors.TransientError`` (retried with backoff) or ``PermanentError`` (dead at
   once); any other exception counts as transient. To pipeline, also give it ``max_batch``
   and ``async deliver_many(intents)`` (``worker.sinks.base.BatchSink``): the relay then hands
   it up to ``max_batch`` intents of its kind at once.
2. Declare a ``SinkSpec`` in a module that imports *without* your client library (import
   that inside ``build``), so that ``outbox-worker --help`` and the "not configured" reason
   work on a machine without it::

       from worker.sinks.spec import SinkOption, SinkSpec, Target, url_target

       def build(ctx):
           from my_pulsar_sink.sink import PulsarSink  # the client library, only here
           return PulsarSink(ctx.options["pulsar_url"], timeout=ctx.timeout,
                             id_prefix=ctx.id_prefix, max_bytes=ctx.max_bytes)

       SPEC = SinkSpec(
           kinds=("pulsar",),
           options=(SinkOption("--pulsar-url", "OUTBOX_PULSAR_URL",
                               "broker for the pulsar kind: pulsar://host:port", secret="url"),),
           build=build,
           describe=lambda values: url_target("pulsar", values["pulsar_url"], default_port=6650),
       )

3. Name it in your ``pyproject.toml``; the worker finds it wherever your distribution is
   installed (any ``sys.path`` entry)::

       [project.entry-points."pg_outbox_relay.sinks"]
       pulsar = "my_pulsar_sink.spec:SPEC"

The contract, field by field:

* ``kinds``: the intent kinds it delivers (built once per kind). A kind that a built-in or
  another installed sink already has is a one-line start-up error. ``--handlers`` still
  wins over any sink, as for the built-in ones.
* ``options``: its flags. Each has an environment variable, help for ``--help``, a
  ``convert`` (``str`` -> value; a ``ValueError`` is a one-line error naming the flag or the
  variable: wrap it with ``worker.cli.options.expecting("a WHAT")``), a default and whether it
  is a ``switch`` (no value; ``VAR=1`` in the environment) or may be given several times
  (``repeat``: its value is a tuple of every one given, the variable holds them one a
  line). ``secret="url"`` (or ``"urls"`` for a comma-separated list, ``"text"`` for a
  token or for values that hold one) says the value holds a secret: never print it whole
  (the start-up line shows scheme, user, host and port). Logs mask passwords where they
  stand (a URL's userinfo, ``password=``), never by searching for a value.
  Flags and variables must not clash with any other's.
* ``build(ctx)``: the sink for ``ctx.kind`` from ``ctx.options`` (every option's value,
  its default when not given) and the run settings in ``ctx``. Raise ``ConfigError`` for a
  bad value (one line, the worker does not start). An ``ImportError`` of a library that is
  not installed is the missing-extra error below.
* ``extra``: the pip extra that brings its client library (``pip install 'DIST[EXTRA]'`` in
  the message; DIST is the distribution that declared the entry point).
* ``configured(values)``: whether the operator turned it on (default: some option is set
  to something other than its default). A kind that is not configured, unless
  ``always_on``, still gets a sink: its intents end dead with "not configured: start it with
  FLAG or VARIABLE". A configured kind whose library is missing stops the start; one that
  is not (or is ``always_on`` and not configured) turns its intents dead with the
  ``pip install`` line instead.
* ``describe(values)``: its start-up line, a ``Target`` naming the server(s) without any
  secret, with the ``Endpoint``s the worker probes with one TCP connect (``url_target``
  does it for a URL). ``None``: no line.
* ``timeout``: the sink's own per-delivery timeout in seconds, when ``--delivery-timeout``
  and ``--limits KIND:timeout`` are longer; ``ctx.timeout`` is the shortest of them.
* Capabilities are the sink object's own, not the spec's: a ``BatchSink`` gets batches;
  ``--limits`` wraps any sink (concurrency, rate, timeout; the claim skips a saturated
  kind); ``ctx.max_bytes`` is ``--limits KIND:max_bytes`` for the sink to enforce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from worker.sinks.base import Sink

__all__ = [
    "Endpoint",
    "SinkContext",
    "SinkOption",
    "SinkSpec",
    "Target",
    "Values",
    "shown_url",
    "url_target",
]

Secret = Literal["url", "urls", "text"]


@dataclass(frozen=True, slots=True)
class SinkOption:
    flag: str  # --rabbitmq-url; its name in ctx.options and Settings.sink_options: rabbitmq_url
    env: str  # OUTBOX_RABBITMQ_URL
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    switch: bool = False  # a flag with no value; the variable takes 1/0, true/false, ...
    secret: Secret | None = None
    repeat: bool = False  # given several times: a tuple of them all (the variable: one a line)

    @property
    def name(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def how(self) -> str:
        """How an operator sets it: ``--flag or VARIABLE``."""
        return f"{self.flag} or {self.env}{'=1' if self.switch else ''}"


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What ``build`` gets: the kind, its options and the run settings a sink needs."""

    kind: str
    options: Mapping[str, Any]  # every option of the spec by name, its default if not given
    concurrency: int  # --concurrency: deliveries in flight at once (size a pool with it)
    timeout: float  # shortest of the spec's timeout, --delivery-timeout, --limits KIND:timeout
    max_bytes: int | None  # --limits KIND:max_bytes; None: the sink's own default
    id_prefix: str  # --message-id-prefix, before the intent id in idempotency keys
    max_retry_after: float  # --backoff-max: the longest a server's Retry-After may defer


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    shown: str  # the server as the log names it: scheme, user, host, port; never a secret


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # or several, comma-separated
    text: str
    endpoints: tuple[Endpoint, ...] = ()
    hint: str = ""  # added to the "cannot reach" warning


Values = Mapping[str, Any]


@dataclass(frozen=True)
class SinkSpec:
    kinds: tuple[str, ...]
    build: Callable[[SinkContext], Sink]
    options: tuple[SinkOption, ...] = ()
    extra: str | None = None
    always_on: bool = False  # built with its defaults even when nothing of it is set
    configured: Callable[[Values], bool] | None = None
    describe: Callable[[Values], Target] | None = None
    timeout: float | None = None
    distribution: str | None = None  # set by the registry: who declared it

    def is_configured(self, values: Values) -> bool:
        if self.configured is not None:
            return self.configured(values)
        return any(values[o.name] is not None and values[o.name] != o.default for o in self.options)

    def how_to_configure(self) -> str:
        return self.options[0].how if self.options else "its options"


_DEFAULT_PORTS = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671, "redis": 6379, "rediss": 6379}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def shown_url(scheme: str, user: str | None, host: str, port: int, path: str = "") -> str:
    """A server as a log line may show it: never a password."""
    return f"{scheme}://{f'{user}@' if user else ''}{_host(host)}:{port}{path}"


def url_target(kind: str, url: str, what: str = "", default_port: int = 0) -> Target:
    """A server at one URL (RabbitMQ, Redis, ...): scheme, user, host, port and path, no
    password; probed at start-up when its port is known."""
    parts = urlsplit(url.strip())
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, default_port)
    host = parts.hostname or ""
    where = shown_url(parts.scheme, parts.username, host, port, parts.path)
    return Target(kind, where + what, (Endpoint(host, port, where),) if port else ())
