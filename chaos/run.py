"""One chaos run: start workers, submit jobs, disrupt, drain, save what happened.

:func:`run_chaos` leaves in its folder ``run.json``, the job records
(``records/``) and one log per worker process (``worker-N.log``);
:func:`chaos.analysis.analyze` turns them into the report. Every worker runs in
a process group of its own and is killed, group and all, when the run ends,
fails or is interrupted.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.states import READY_STATES
from kombu import Queue

from celery_turnout import history

from . import TASK_NAME
from .analysis import build_copies, read_records
from .monkey import Monkey
from .source import ROOT
from .workers import ChaosCluster, ProcessWatch

#: The brokers a chaos run knows, on this machine's loopback. Redis databases
#: 5 to 7 keep a run apart from the integration tests (databases 1 to 3): the
#: shortened visibility timeout below makes a worker return every old
#: unacknowledged message of its database, whoever's it is.
REDIS = "redis://127.0.0.1:6379"
BROKERS = {
    "redis": f"{REDIS}/5",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
RESULTS = f"{REDIS}/6"
STORE = f"{REDIS}/7"

#: Redis returns a dead consumer's unacknowledged messages after this many
#: seconds, "a few intervals" as the README advises, instead of an hour.
VISIBILITY_TIMEOUT = 6

#: Most messages looked at when the run notes what waits in the task queue.
QUEUE_LOOK_LIMIT = 100_000

#: Seconds between two progress lines.
PROGRESS_EVERY = 30.0
#: Seconds allowed after the chaos for paused workers to resume, leaving ones
#: to exit and replacements to start.
SETTLE_TIMEOUT = 120.0


@dataclass
class ChaosConfig:
    """What a run does; every field is printed with the report."""

    broker: str
    minutes: float
    jobs: int
    workers: int = 3
    concurrency: int = 4
    interval: float = 1.0
    shortest: float = 3.0
    longest: float = 60.0
    submit_fraction: float = 0.5
    gap_min: float = 2.0
    gap_max: float = 8.0
    drain_seconds: float = 600.0
    seed: int = 0
    log_level: str = "INFO"


def broker_env(
    config: ChaosConfig, token: str, records: Path, source: Path
) -> dict[str, str]:
    """Return the ``TURNOUT_IT_*`` variables (see ``tests/integration/app.py``)."""
    options: dict[str, Any] = {}
    if config.broker == "redis":
        options = {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # A worker killed while it holds the restore lock blocks restores
            # until the lock expires.
            "unacked_mutex_expire": VISIBILITY_TIMEOUT,
        }
    return {
        "TURNOUT_IT_BROKER_URL": BROKERS[config.broker],
        "TURNOUT_IT_TRANSPORT_OPTIONS": json.dumps(options),
        "TURNOUT_IT_RESULT_BACKEND": RESULTS,
        "TURNOUT_IT_STORE_URL": STORE,
        "TURNOUT_IT_QUEUE_PREFIX": f"chaos-{token}",
        "TURNOUT_IT_TASK_QUEUE": f"chaos-jobs-{token}",
        "TURNOUT_IT_INTERVAL": f"{config.interval:g}",
        "TURNOUT_IT_RECORDS": str(records),
        "PYTHONPATH": str(source),
    }


def plan_jobs(config: ChaosConfig, rng: random.Random) -> list[tuple[float, float]]:
    """Return (submit offset in seconds, job length in seconds), by offset.

    Lengths are log-uniform between ``shortest`` and ``longest``; offsets are
    uniform over the first ``submit_fraction`` of the chaos, the first at 0.
    """
    window = config.minutes * 60 * config.submit_fraction
    low, high = math.log(config.shortest), math.log(config.longest)
    offsets = sorted([0.0] + [rng.uniform(0, window) for _ in range(config.jobs - 1)])
    return [(o, round(math.exp(rng.uniform(low, high)), 1)) for o in offsets]


def run_chaos(
    config: ChaosConfig,
    directory: Path,
    command: str = "",
    code: str = "working tree",
    source: Path = ROOT,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Run the chaos described by ``config`` in ``directory``; return the folder.

    Args:
        config: What to run.
        directory: An empty folder for the logs, records and ``run.json``.
        command: The command line, for the report.
        code: Which code the workers run, for the report.
        source: The root the workers import ``celery_turnout`` and ``chaos``
            from (``tests/integration`` is found by the harness itself).
        say: Where progress lines go.
    """
    emit = say or _print
    token = uuid.uuid4().hex[:8]
    records = directory / "records"
    records.mkdir(parents=True, exist_ok=True)
    env = broker_env(config, token, records, source)
    cluster = ChaosCluster(config.broker, env, directory, token, config.log_level)
    rng = random.Random(config.seed)
    watch = ProcessWatch()
    monkey = Monkey(
        cluster, watch, rng, config.interval, config.workers, config.concurrency,
        (config.gap_min, config.gap_max), lambda text: emit(f"{_clock()} {text}"),
    )
    jobs: list[dict[str, Any]] = []
    notes: list[str] = []
    saved: dict[str, Any] = {
        "config": asdict(config), "command": command, "code": code,
        "directory": str(directory), "token": token, "started": time.time(),
    }
    watch.start()
    try:
        monkey.start_workers()
        emit(f"{_clock()} {config.workers} workers up; chaos for "
            f"{config.minutes:g} min on {config.broker}, folder {directory}")
        plan = plan_jobs(config, rng)
        saved["chaos_from"] = start = time.time()
        saved["chaos_to"] = end = start + config.minutes * 60
        monkey.begin()
        next_progress = start + PROGRESS_EVERY
        while time.time() < end:
            now = time.time()
            while plan and start + plan[0][0] <= now:
                _, seconds = plan.pop(0)
                result = cluster.send(TASK_NAME, seconds)
                jobs.append({"id": result.id, "seconds": seconds,
                             "submitted": time.time()})
            monkey.step()
            if now >= next_progress:
                next_progress += PROGRESS_EVERY
                emit(f"{_clock()} {now - start:.0f} s: {len(jobs)} jobs submitted, "
                    f"{len(monkey.disruptions)} disruptions, "
                    f"{monkey.up_count()} workers up")
            time.sleep(0.05)
        for _, seconds in plan:
            result = cluster.send(TASK_NAME, seconds)
            jobs.append({"id": result.id, "seconds": seconds, "submitted": time.time()})
        emit(f"{_clock()} chaos over after {len(monkey.disruptions)} disruptions; "
            "resuming and restarting workers")
        monkey.finish(SETTLE_TIMEOUT)
        saved["drained"] = _drain(cluster, jobs, config.drain_seconds, emit)
        saved["running_at_end"] = _running(
            records, watch, [i.to_json() for i in monkey.incarnations]
        )
        queue = env["TURNOUT_IT_TASK_QUEUE"]
        try:
            saved["waiting_at_end"] = waiting(config.broker, cluster.app, queue)
        except Exception as exc:
            saved["waiting_at_end"] = None
            notes.append(
                f"what waited in queue {queue} at the drain deadline is unknown: "
                f"{exc!r}; jobs that waited there count as lost"
            )
        saved["horizon"] = time.time()
    finally:
        monkey.resume_all()
        cluster.destroy()
        watch.stop()
    saved["jobs"] = jobs
    saved["workers"] = [i.to_json() for i in monkey.incarnations]
    saved["disruptions"] = [d.to_json() for d in monkey.disruptions]
    saved["failures"] = monkey.failures + notes
    saved["processes"] = [life.to_json() for life in watch.snapshot()]
    saved["states"] = {j["id"]: cluster.app.AsyncResult(j["id"]).state for j in jobs}
    saved["history"] = {j["id"]: history(cluster.app, j["id"]) for j in jobs}
    (directory / "run.json").write_text(json.dumps(saved, indent=1))
    return directory


def _drain(
    cluster: ChaosCluster, jobs: list[dict[str, Any]], timeout: float,
    say: Callable[[str], None],
) -> float:
    """Wait until every job is ready or ``timeout`` passed; return when it ended."""
    waiting = {j["id"] for j in jobs}
    deadline = time.time() + timeout
    next_progress = time.time() + PROGRESS_EVERY
    while waiting and time.time() < deadline:
        waiting = {
            job for job in waiting
            if cluster.app.AsyncResult(job).state not in READY_STATES
        }
        if time.time() >= next_progress:
            next_progress += PROGRESS_EVERY
            say(f"{_clock()} draining: {len(waiting)} jobs not finished yet")
        time.sleep(1.0)
    say(f"{_clock()} drain over: {len(waiting)} jobs not finished")
    return time.time()


def _running(
    records: Path, watch: ProcessWatch, workers: list[dict[str, Any]]
) -> list[str]:
    """Return the jobs of which some copy still runs now.

    A copy whose process the watch never saw is not counted: after the scan
    below, every live process of a worker is in the watch's list.
    """
    watch.scan()
    lives = [life.to_json() for life in watch.snapshot()]
    copies = build_copies(read_records(records), lives, workers)
    return sorted({c.job for c in copies if c.end is None and c.watched})


def waiting(broker: str, app: Celery, queue: str) -> dict[str, str]:
    """Return the jobs whose messages wait in the broker now: job id -> where.

    ``where`` is ``queue`` for a message in ``queue`` that no worker took yet,
    or, on Redis, ``unacked`` for one that a worker took without acknowledging
    it, which the broker returns to the queue after the visibility timeout if
    that worker is gone. A message a live worker took is not listed: that
    worker admitted the job, and its history says so.
    """
    if broker == "redis":
        return _waiting_on_redis(str(app.conf.broker_url), queue)
    return _waiting_on_rabbitmq(app, queue)


def _waiting_on_redis(url: str, queue: str) -> dict[str, str]:
    # Read only: the queue's lists (one per priority, named after the queue)
    # and the hash of taken but unacknowledged messages.
    client = redis.Redis.from_url(url)
    found: dict[str, str] = {}
    try:
        for key in client.scan_iter(match=f"{queue}*"):
            if client.type(key) == b"list":
                for raw in client.lrange(key, 0, QUEUE_LOOK_LIMIT):
                    found[_job_of(json.loads(raw))] = "queue"
        for raw in client.hvals("unacked"):
            payload, _exchange, routing_key = json.loads(raw)
            if routing_key == queue:
                found.setdefault(_job_of(payload), "unacked")
    finally:
        client.close()
    return found


def _waiting_on_rabbitmq(app: Celery, queue: str) -> dict[str, str]:
    # RabbitMQ shows a queue's messages only to a consumer: take each one
    # without acknowledging it; closing the channel puts them all back.
    found: dict[str, str] = {}
    with app.connection_for_read() as connection:
        channel = connection.channel()
        try:
            bound = Queue(queue).bind(channel)
            for _ in range(QUEUE_LOOK_LIMIT):
                message = bound.get(no_ack=False)
                if message is None:
                    break
                found[str(message.headers.get("id"))] = "queue"
        finally:
            channel.close()
    return found


def _job_of(payload: dict[str, Any]) -> str:
    """The job id in a Redis transport message (Celery message protocol 2)."""
    return str(payload.get("headers", {}).get("id"))


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _clock() -> str:
    return time.strftime("%H:%M:%S")
