"""The Celery app that the integration tests run in real worker processes.

Everything that differs between tests comes from environment variables, so the
worker processes and the test process build the same app from the same mapping:

- ``TURNOUT_IT_BROKER_URL``: the broker (``filesystem://``, ``redis://``, ``amqp://``).
- ``TURNOUT_IT_TRANSPORT_OPTIONS``: ``broker_transport_options`` as a JSON object.
- ``TURNOUT_IT_RESULT_BACKEND``: the result backend URL.
- ``TURNOUT_IT_STORE_URL``: turnout's claim store (``turnout_store_url``).
- ``TURNOUT_IT_QUEUE_PREFIX``: ``turnout_queue_prefix``, unique per test.
- ``TURNOUT_IT_TASK_QUEUE``: the queue jobs are sent to, unique per test.
- ``TURNOUT_IT_INTERVAL``: ``turnout_supervise_interval`` in seconds.
- ``TURNOUT_IT_SHUTDOWN``: ``turnout_shutdown`` (``handoff`` or ``wait``).
- ``TURNOUT_IT_SOFT_SHUTDOWN_TIMEOUT``: Celery's ``worker_soft_shutdown_timeout``
  in seconds (0, the default, turns the soft shutdown off).
- ``TURNOUT_IT_RECORDS``: the directory where jobs write what they did.
- ``TURNOUT_IT_TASK_EVENTS``: ``1`` makes workers send events, as ``-E`` does.
- ``TURNOUT_IT_QUEUE_EXPIRES``: ``turnout_queue_expires`` in seconds (default:
  turnout's own).

Each job appends one JSON line per event (``start``, ``finish``) to
``<records>/<job id>.jsonl``, so a test can see every attempt of a job, on which
worker and in which process it ran, and when.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery, Task
from kombu import Queue
from poison_jobs import register_poison_jobs
from progress_jobs import register_progress_jobs

from celery_turnout import turnout_task

#: Seconds between two looks at the clock while a job sleeps or spins.
STEP = 0.05

#: How long RabbitMQ and Redis keep a test's queues after their last use.
QUEUE_EXPIRES_MS = 10 * 60 * 1000


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the integration-test app from a mapping of ``TURNOUT_IT_*`` variables.

    Args:
        env: The variables; missing ones fall back to a local Redis.

    Returns:
        A configured app with the test jobs registered under fixed names, so that
        the test process and the workers agree on them however they import this.
    """
    app = Celery("turnout_it", set_as_current=False)
    task_queue = env.get("TURNOUT_IT_TASK_QUEUE", "turnout-it")
    app.conf.update(
        broker_url=env.get("TURNOUT_IT_BROKER_URL", "redis://127.0.0.1:6379/1"),
        broker_transport_options=json.loads(
            env.get("TURNOUT_IT_TRANSPORT_OPTIONS", "{}")
        ),
        broker_connection_retry_on_startup=True,
        result_backend=env.get("TURNOUT_IT_RESULT_BACKEND", "redis://127.0.0.1:6379/2"),
        result_expires=3600,
        task_default_queue=task_queue,
        task_queues=[
            Queue(task_queue, queue_arguments={"x-expires": QUEUE_EXPIRES_MS}),
        ],
        # Long jobs: a worker reserves no more jobs than it can start at once.
        worker_prefetch_multiplier=1,
        turnout_supervise_interval=float(env.get("TURNOUT_IT_INTERVAL", "1")),
        turnout_store_url=env.get("TURNOUT_IT_STORE_URL", "redis://127.0.0.1:6379/3"),
        turnout_queue_prefix=env.get("TURNOUT_IT_QUEUE_PREFIX", "turnout-it"),
        turnout_shutdown=env.get("TURNOUT_IT_SHUTDOWN", "handoff"),
        worker_soft_shutdown_timeout=float(
            env.get("TURNOUT_IT_SOFT_SHUTDOWN_TIMEOUT", "0")
        ),
        turnout_monitor_queue_expires=QUEUE_EXPIRES_MS / 1000,
        worker_send_task_events=env.get("TURNOUT_IT_TASK_EVENTS") == "1",
    )
    if "TURNOUT_IT_QUEUE_EXPIRES" in env:
        app.conf.turnout_queue_expires = float(env["TURNOUT_IT_QUEUE_EXPIRES"])
    records = Path(env.get("TURNOUT_IT_RECORDS", "records"))
    _register_jobs(app, records)
    return app


def _register_jobs(app: Celery, records: Path) -> None:
    """Register the jobs the tests send, writing their records under ``records``."""

    def record(task: Task, event: str, **fields: Any) -> None:
        write(task.request.id, task, event, **fields)

    def write(job_id: str, task: Task, event: str, **fields: Any) -> None:
        line = {
            "job": job_id,
            "attempt": getattr(task, "attempt", None),
            "worker": task.request.hostname,
            "pid": os.getpid(),
            "event": event,
            "time": time.time(),
            **fields,
        }
        records.mkdir(parents=True, exist_ok=True)
        path = records / f"{job_id}.jsonl"

        # One write of one line with O_APPEND: lines from several processes
        # never interleave.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    def outcome(task: Task, seconds: float) -> dict[str, Any]:
        return {
            "job": task.request.id,
            "attempt": getattr(task, "attempt", None),
            "worker": task.request.hostname,
            "pid": os.getpid(),
            "seconds": seconds,
        }

    @turnout_task(app, name="it.sleeper", bind=True)
    def sleeper(self: Task, seconds: float) -> dict[str, Any]:
        """Sleep in small steps, recording the start and the finish."""
        record(self, "start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(STEP)
        record(self, "finish")
        return outcome(self, seconds)

    @turnout_task(app, name="it.spinner", bind=True)
    def spinner(self: Task, seconds: float) -> dict[str, Any]:
        """Keep a CPU busy for ``seconds``, recording the start and the finish."""
        record(self, "start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sum(range(1000))
        record(self, "finish")
        return outcome(self, seconds)

    @turnout_task(app, name="it.retrier", bind=True)
    def retrier(self: Task, times: int, countdown: float) -> dict[str, Any]:
        """Ask Celery to retry ``times`` times, ``countdown`` seconds apart."""
        record(self, "start", retries=self.request.retries)
        if self.request.retries < times:
            raise self.retry(countdown=countdown, max_retries=times)
        record(self, "finish")
        return outcome(self, 0.0)

    @app.task(name="it.plain_sleeper", bind=True, acks_late=True)
    def plain_sleeper(self: Task, seconds: float) -> dict[str, Any]:
        """Sleep like ``it.sleeper``, as a plain late-acking Celery task."""
        record(self, "start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(STEP)
        record(self, "finish")
        return outcome(self, seconds)

    @app.task(name="it.errback", bind=True)
    def errback(self: Task, failed_id: str) -> None:
        """A ``link_error`` errback: record ``errback`` with the failed job."""
        write(failed_id, self, "errback", errback=self.request.id)

    @app.task(name="it.gather", bind=True)
    def gather(self: Task, results: list[Any]) -> list[Any]:
        """A chord body: record ``gather`` under its own id, return the results."""
        record(self, "gather")
        return results

    register_progress_jobs(app, record)
    register_poison_jobs(app, record)


app = create_app(os.environ)
