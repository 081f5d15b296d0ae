"""The Celery app that the celery-kind tests run as a real, unmodified worker::

    celery -b BROKER -A tests.celery_app worker --pool solo -Q QUEUE

Its tasks append one JSON line per run to the file named by OUTBOX_TEST_CELERY_RECORD:
the task id, name, args, kwargs, eta, and the time it ran. No result backend.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, Task

app = Celery("outbox_test")
app.conf.update(
    task_ignore_result=True,
    worker_enable_remote_control=False,  # no pidbox queues left behind on the broker
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    enable_utc=True,
)


def _record(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    line = {
        "id": task.request.id,
        "task": task.name,
        "args": list(args),
        "kwargs": kwargs,
        "eta": task.request.eta,
        "expires": task.request.expires,
        "ran_at": time.time(),
    }
    with open(os.environ["OUTBOX_TEST_CELERY_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


@app.task(bind=True, name="tests.record")
def record(self: Task, *args: Any, **kwargs: Any) -> None:
    _record(self, args, kwargs)


@app.task(bind=True, name="myapp.tasks.send_welcome")
def send_welcome(self: Task, user_id: int) -> None:
    """The task of docs/kinds/celery.md: it would email the user; here it records its call."""
    _record(self, (user_id,), {})
