"""Which event loop the worker runs on: uvloop where it is installed (Linux and macOS,
CPython), else asyncio's own. uvloop cut the worker's CPU per no-op intent by about a
quarter in bench/ (its transports and callbacks are C)."""

from __future__ import annotations

import importlib.util
from typing import Any


def backend_options() -> dict[str, Any]:
    """For ``anyio.run(..., backend_options=...)``."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}
