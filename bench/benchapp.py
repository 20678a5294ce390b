"""The Celery app the benchmarks run in real worker processes.

Like the integration tests' app, everything comes from environment variables,
so the workers and the benchmark process build the same app from one mapping:

- ``BENCH_BROKER_URL``, ``BENCH_TRANSPORT_OPTIONS`` (JSON), ``BENCH_RESULT_BACKEND``,
  ``BENCH_STORE_URL``: where messages, results and turnout's claims go.
- ``BENCH_QUEUE``: the queue jobs are sent to; ``BENCH_PREFIX``: turnout's prefix.
- ``BENCH_INTERVAL``: ``turnout_supervise_interval`` in seconds.
- ``BENCH_RECORDS``: where jobs write their start records (one JSON line each).
- ``BENCH_COUNTER_URL``: a Redis URL; short jobs count themselves there.

Jobs write a start record ``{"job", "attempt", "worker", "pid", "time"}`` to
``<records>/<job id>.jsonl``. Sleeping jobs end when their time is up or when
the file ``<records>/<job id>.stop`` appears, whichever comes first.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import redis
from celery import Celery, Task
from kombu import Queue

from celery_turnout import turnout_task

#: Seconds between two looks for a job's stop file.
STEP = 0.05

#: How long the broker keeps a benchmark's job queue after its last use.
QUEUE_EXPIRES_MS = 30 * 60 * 1000


def create_app(env: Mapping[str, str]) -> Celery:
    """Build the benchmark app from a mapping of ``BENCH_*`` variables."""
    app = Celery("turnout_bench", set_as_current=False)
    queue = env.get("BENCH_QUEUE", "bench")
    app.conf.update(
        broker_url=env.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/1"),
        broker_transport_options=json.loads(env.get("BENCH_TRANSPORT_OPTIONS", "{}")),
        broker_connection_retry_on_startup=True,
        result_backend=env.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/2"),
        result_expires=3600,
        task_default_queue=queue,
        task_queues=[Queue(queue, queue_arguments={"x-expires": QUEUE_EXPIRES_MS})],
        worker_hijack_root_logger=True,
        turnout_supervise_interval=float(env.get("BENCH_INTERVAL", "1")),
        turnout_store_url=env.get("BENCH_STORE_URL", "redis://127.0.0.1:6379/3"),
        turnout_queue_prefix=env.get("BENCH_PREFIX", "turnout-bench"),
    )
    _register(app, Path(env.get("BENCH_RECORDS", "records")),
              env.get("BENCH_COUNTER_URL", ""))
    return app


def _register(app: Celery, records: Path, counter_url: str) -> None:
    """Register the benchmark jobs under fixed names."""
    local = threading.local()

    def record(task: Task) -> None:
        line = {
            "job": task.request.id,
            "attempt": getattr(task, "attempt", None),
            "worker": task.request.hostname,
            "pid": os.getpid(),
            "time": time.time(),
        }
        records.mkdir(parents=True, exist_ok=True)
        fd = os.open(records / f"{task.request.id}.jsonl",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    def wait(task: Task, seconds: float) -> None:
        stop = records / f"{task.request.id}.stop"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.exists():
            time.sleep(STEP)

    def sleep(self: Task, seconds: float) -> float:
        record(self)
        wait(self, seconds)
        return seconds

    turnout_task(app, name="bench.sleeper", bind=True)(sleep)
    app.task(name="bench.late_sleeper", bind=True, acks_late=True)(sleep)
    app.task(name="bench.early_sleeper", bind=True, acks_late=False)(sleep)

    @turnout_task(app, name="bench.napper", bind=True)
    def napper(self: Task, seconds: float) -> float:
        """Sleep in one call, so that a thousand of them cost no CPU."""
        time.sleep(seconds)
        return seconds

    @turnout_task(app, name="bench.spinner", bind=True)
    def spinner(self: Task, seconds: float) -> float:
        """Keep one CPU busy for ``seconds``."""
        record(self)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sum(range(1000))
        return seconds

    def short(self: Task, counter: str, cpu_ms: float = 0.0) -> int:
        """A short job: use the CPU for ``cpu_ms``, then count itself in Redis."""
        deadline = time.thread_time() + cpu_ms / 1000
        while time.thread_time() < deadline:
            pass
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = redis.Redis.from_url(counter_url)
        return int(client.incr(counter))

    turnout_task(app, name="bench.short_turnout", bind=True)(short)
    app.task(name="bench.short_plain", bind=True)(short)
    app.task(name="bench.short_plain_late", bind=True, acks_late=True)(short)


app = create_app(os.environ)
