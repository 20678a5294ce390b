"""Progress and checkpoints of running jobs, seen from outside and across takeovers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

import pytest
from harness import (
    APP_DIR,
    Cluster,
    celery_cli,
    wait_for,
    wait_for_one_errback,
    worker_environment,
)

import celery_turnout

pytestmark = pytest.mark.integration

#: Seconds allowed for an owner's death to show as the next attempt's start.
TAKEOVER_TIMEOUT = 15.0


def listed_progress(cluster: Cluster, job_id: str) -> dict[str, Any] | None:
    """The progress ``inspect turnout-jobs`` shows for a job, if it lists it."""
    for reply in cluster.inspect("turnout-jobs").values():
        for entry in reply.get("ok", []):
            if entry["id"] == job_id and entry.get("progress"):
                progress: dict[str, Any] = entry["progress"]
                return progress
    return None


def wait_until_covered(cluster: Cluster, job_id: str) -> None:
    """Wait until supervision covers the job, so that a takeover can find it."""
    wait_for(
        lambda: any(
            e["event"] == "covered" for e in celery_turnout.history(cluster.app, job_id)
        ),
        timeout=3 * cluster.interval + 5,
        what=f"job {job_id} to be covered by supervision",
    )


def start_watch(env: Mapping[str, str], job_id: str) -> subprocess.Popen[str]:
    """Start ``celery turnout watch JOB_ID --json`` like a user would."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "app", "turnout", "watch", job_id,
         "--json", "--timeout", "60"],
        env=worker_environment(env), cwd=APP_DIR, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish_watch(watch: subprocess.Popen[str]) -> tuple[int, list[dict[str, Any]]]:
    """Wait for a watch to exit; return its status and the updates it printed."""
    out, err = watch.communicate(timeout=90)
    updates = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert updates, f"watch printed nothing; stderr:\n{err}"
    return watch.returncode, updates


def test_progress_shows_in_inspect_the_result_backend_and_the_cli(
    cluster: Cluster,
) -> None:
    cluster.start(1)
    job = cluster.send("it.counter", 8, 0.5)
    watch = start_watch(cluster.env, job.id)

    info = wait_for(
        lambda: job.state == "PROGRESS" and job.info,
        timeout=20,
        what=f"job {job.id} to show PROGRESS",
    )
    assert set(info) == {"done", "total", "note", "attempt"}
    assert info["total"] == 8 and info["attempt"] == 1 and info["done"] >= 1

    listed = wait_for(
        lambda: listed_progress(cluster, job.id),
        timeout=10,
        what=f"inspect turnout-jobs to show the progress of {job.id}",
    )
    assert listed["total"] == 8 and listed["attempt"] == 1
    (worker,) = cluster.workers
    table = json.loads(
        celery_cli(
            cluster.env,
            "turnout",
            "jobs",
            "--json",
            "--destination",
            worker.name,
            "--timeout",
            "10",
        )  # fmt: skip
    )
    (entry,) = [j for j in table["jobs"] if j["id"] == job.id]
    assert entry["task"] == "it.counter" and entry["attempt"] == 1

    outcome = job.get(timeout=30)
    assert outcome["sum"] == sum(range(8))
    final = celery_turnout.progress_of(cluster.app, job.id)
    assert final is not None and final["done"] == 8, "the last value is flushed"

    status, updates = finish_watch(watch)
    assert status == 0
    assert updates[-1]["state"] == "SUCCESS"
    assert any(u["state"] == "PROGRESS" and u["done"] for u in updates)


def test_a_checkpointed_job_taken_over_after_sigkill_resumes_from_its_checkpoint(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    steps = 12
    job = cluster.send("it.counter", steps, 0.4, True)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)
    wait_for(
        lambda: len(cluster.records.events(job.id, "step", attempt=1)) >= 4,
        timeout=20,
        what=f"job {job.id} to count four steps",
    )

    owner.kill()
    saved = celery_turnout.checkpoint_of(cluster.app, job.id)
    assert saved is not None and saved["attempt"] == 1
    second = cluster.wait_started(job.id, attempt=2, timeout=TAKEOVER_TIMEOUT)
    assert second["resumed_from"] == saved["state"]["next"] >= 4

    # The backend shows the new attempt as soon as it starts, never attempt 1's
    # last PROGRESS.
    shown = wait_for(
        lambda: (
            isinstance(job.info, dict) and job.info.get("attempt") == 2 and job.info
        ),
        timeout=10,
        what=f"the result backend to show attempt 2 of {job.id}",
    )
    assert job.state in ("STARTED", "PROGRESS") and shown["done"] >= 4

    outcome = job.get(timeout=30)
    assert outcome["attempt"] == 2
    assert outcome["sum"] == sum(range(steps)), "a step was counted twice or lost"
    redone = [r["step"] for r in cluster.records.events(job.id, "step", attempt=2)]
    assert redone == list(range(saved["state"]["next"], steps))


def test_after_the_last_attempt_is_lost_the_state_is_failure_not_progress(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    # Long enough (20 s) to be running still when its owner is killed, even
    # when a loaded machine slows the start and the cover.
    job = cluster.send("it.fragile_counter", 40, 0.5)
    first = cluster.wait_started(job.id)
    wait_until_covered(cluster, job.id)
    wait_for(lambda: job.state == "PROGRESS", 10, f"job {job.id} to show PROGRESS")

    cluster.owner_of(first).kill()
    assert not cluster.records.events(job.id, "finish"), "too slow a start"
    wait_for(
        lambda: job.state == "FAILURE",
        timeout=TAKEOVER_TIMEOUT,
        what=f"job {job.id} to end FAILURE",
    )
    assert "JobExhausted" in type(job.result).__name__
    watch = start_watch(cluster.env, job.id)
    status, updates = finish_watch(watch)
    assert status == 1 and updates[-1]["state"] == "FAILURE"
    assert cluster.app.AsyncResult(job.id).state == "FAILURE"


@pytest.mark.transports("redis")
def test_a_stalled_job_is_restarted_as_its_next_attempt(cluster: Cluster) -> None:
    cluster.start(2)
    job = cluster.send("it.stall_restarter", 60.0)

    outcome = job.get(timeout=30)

    assert outcome["attempt"] == 2
    events = [
        (e["event"], e["attempt"]) for e in celery_turnout.history(cluster.app, job.id)
    ]
    assert ("stalled", 1) in events and ("restarted", 2) in events
    assert cluster.wait_until_logged("has made no progress for", 5)


@pytest.mark.transports("redis")
def test_a_stalled_job_with_on_stall_fail_ends_failure(cluster: Cluster) -> None:
    cluster.start(1)
    job = cluster.send("it.stall_failer", 60.0)

    wait_for(lambda: job.state == "FAILURE", 30, f"job {job.id} to end FAILURE")

    assert type(job.result).__name__ == "JobStalled"
    assert "did not move" in str(job.result)
    assert not cluster.records.events(job.id, "finish")


@pytest.mark.transports("redis", "rabbitmq")
def test_a_stalled_job_with_on_stall_fail_calls_its_errback_once(
    cluster: Cluster,
) -> None:
    cluster.start(1)
    job = cluster.app.send_task(
        "it.stall_failer", args=(60.0,), link_error=cluster.app.signature("it.errback")
    )

    wait_for(lambda: job.state == "FAILURE", 30, f"job {job.id} to end FAILURE")
    wait_for_one_errback(cluster, job.id)


class EventLog:
    """Every Celery event the workers send, captured on a thread of the test."""

    def __init__(self, app: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(
            self._connection, handlers={"*": self.events.append}
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception:  # the connection closes under it at the end
            pass

    def of(self, job_id: str, prefix: str = "turnout-job-") -> list[tuple[str, Any]]:
        """Return (type, attempt) of the captured turnout events of one job."""
        return [
            (e["type"], e.get("attempt"))
            for e in list(self.events)
            if e.get("uuid") == job_id and e["type"].startswith(prefix)
        ]

    def close(self) -> None:
        """Stop capturing."""
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()


@pytest.mark.transports("redis")
def test_a_takeover_of_a_paused_owner_sends_turnout_events(cluster: Cluster) -> None:
    cluster.env["TURNOUT_IT_TASK_EVENTS"] = "1"
    log = EventLog(cluster.app)
    try:
        cluster.start(2)
        wait_for(
            lambda: any(e["type"] == "worker-heartbeat" for e in log.events),
            timeout=10,
            what="a worker heartbeat event, proof that the capture is on",
        )
        job = cluster.send("it.counter", 12, 0.3, True)
        first = cluster.wait_started(job.id)
        owner = cluster.owner_of(first)
        wait_until_covered(cluster, job.id)
        wait_for(
            lambda: ("turnout-job-progress", 1) in log.of(job.id),
            timeout=10,
            what=f"a progress event of {job.id}",
        )

        owner.stop()
        cluster.wait_started(job.id, attempt=2, timeout=TAKEOVER_TIMEOUT)
        owner.resume()
        assert job.get(timeout=30)["attempt"] == 2
        wait_for(
            lambda: ("turnout-job-fenced", 1) in log.of(job.id),
            timeout=10,
            what=f"the fence event of {job.id}",
        )
        seen = log.of(job.id)
        wait_for(
            lambda: ("turnout-job-finished", 2) in log.of(job.id),
            timeout=10,
            what=f"the finish event of {job.id}",
        )
    finally:
        log.close()

    for expected in [
        ("turnout-job-started", 1),
        ("turnout-job-taken-over", 2),
        ("turnout-job-started", 2),
    ]:
        assert expected in seen, seen
