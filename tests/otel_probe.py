"""A handler for tests that run the worker as a subprocess and ask what its deliveries saw.

Use with `--handlers tests.otel_probe:handlers`; each ``probe`` intent's payload names a file
(``{"out": PATH}``) that gets one JSON object: the trace context the handler was given, and
which ``opentelemetry`` modules the worker process had loaded by then.
"""

from __future__ import annotations

import sys

import anyio
import orjson

from worker import Handlers, Intent

handlers = Handlers()


@handlers.register("probe")
async def probe(intent: Intent) -> None:
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "opentelemetry")
    seen = {"trace_context": intent.trace_context, "opentelemetry_modules": loaded}
    await anyio.Path(intent.payload["out"]).write_bytes(orjson.dumps(seen))
