"""The job that chaos workers run, registered on the integration-test app.

Workers start as ``celery -A app worker --include chaos.jobs``: ``app`` is
``tests/integration/app.py``, and importing this module adds one turnout task to
its app. The job sleeps in small steps and records its start and its finish as
JSON lines in ``<TURNOUT_IT_RECORDS>/<job id>.jsonl``, in the format of the
integration tests' jobs (``job``, ``attempt``, ``worker``, ``pid``, ``event``,
``time``), so that ``harness.Records`` reads them. Each line also carries
``process_start``, the pool process's start time in clock ticks since boot, so
that the analysis finds the process in the watch's list even when the watch
first saw it late, and never takes a later process with the same pid for it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import app as it_app
from celery import Task

from celery_turnout import turnout_task

from . import MAX_TAKEOVERS, TASK_NAME
from .workers import process_stat

#: Seconds between two looks at the clock while the job sleeps.
STEP = 0.05

RECORDS = Path(os.environ.get("TURNOUT_IT_RECORDS", "records"))


def record(task: Task, event: str) -> None:
    """Append one record of ``event`` for the running copy of the job."""
    line: dict[str, Any] = {
        "job": task.request.id,
        "attempt": getattr(task, "attempt", None),
        "worker": task.request.hostname,
        "pid": os.getpid(),
        "process_start": _process_start(),
        "event": event,
        "time": time.time(),
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{task.request.id}.jsonl"
    # One write of one line with O_APPEND: lines of several processes never mix.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _process_start() -> int | None:
    stat = process_stat("self")
    return None if stat is None else stat[2]


@turnout_task(it_app.app, name=TASK_NAME, bind=True, max_takeovers=MAX_TAKEOVERS)
def sleeper(self: Task, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds`` in small steps, recording the start and the finish."""
    record(self, "start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(STEP)
    record(self, "finish")
    return {
        "job": self.request.id,
        "attempt": getattr(self, "attempt", None),
        "worker": self.request.hostname,
        "pid": os.getpid(),
        "seconds": seconds,
    }
