"""outbox-worker: a transactional-outbox relay for PostgreSQL."""

from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.handlers import Handlers

__all__ = ["Handlers", "Intent", "PermanentError", "TransientError", "enqueue"]
