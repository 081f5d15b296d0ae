"""Appends ``{"id": ..., "payload": ...}`` to a file, one JSON line per delivered intent."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from worker.errors import PermanentError
from worker.intent import Intent


class FileLineSink:
    def __init__(self, path: Path) -> None:
        self._path = anyio.Path(path)
        self._lock = anyio.Lock()  # one line at a time: appends from several slots interleave

    async def deliver(self, intent: Intent) -> None:
        if intent.payload.get("refuse"):
            raise PermanentError("refused by the payload")
        line = json.dumps({"id": intent.id, "payload": intent.payload}) + "\n"
        async with self._lock, await self._path.open("a") as file:
            await file.write(line)

    async def aclose(self) -> None:
        pass
