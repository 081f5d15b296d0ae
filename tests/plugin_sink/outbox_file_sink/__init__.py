"""The ``file_line`` kind's spec: on with --file-sink-path; the sink is in sink.py, imported
only when the kind is built (as a client library would be)."""

from __future__ import annotations

from pathlib import Path

from worker.sinks.base import Sink
from worker.sinks.spec import SinkContext, SinkOption, SinkSpec, Target


def _build(ctx: SinkContext) -> Sink:
    from outbox_file_sink.sink import FileLineSink

    return FileLineSink(Path(ctx.options["file_sink_path"]))


SPEC = SinkSpec(
    kinds=("file_line",),
    options=(
        SinkOption(
            "--file-sink-path",
            "OUTBOX_FILE_SINK_PATH",
            "file the file_line kind appends each payload to, one JSON line per intent",
        ),
    ),
    build=_build,
    describe=lambda values: Target("file_line", f"appending to {values['file_sink_path']}"),
)
