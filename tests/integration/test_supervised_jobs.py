"""Supervised jobs on healthy workers: they run once and can be seen while running."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Cluster, stays_false, wait_for

import celery_turnout

pytestmark = pytest.mark.integration

#: Seconds a tick may run late on a loaded two-core machine.
COVER_SLACK = 0.5


def ended_with_finished(history: list[dict[str, Any]]) -> list[str] | None:
    """Return a history's event names if its last event is 'finished'."""
    events = [e["event"] for e in history]
    return events if events and events[-1] == "finished" else None


def test_a_job_finishes_on_its_first_attempt(cluster: Cluster) -> None:
    cluster.start(2)

    job = cluster.send("it.sleeper", 1.0)
    outcome = job.get(timeout=30)

    assert outcome["job"] == job.id
    assert outcome["attempt"] == 1
    assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1]
    assert [r["attempt"] for r in cluster.records.events(job.id, "finish")] == [1]
    # Completion is claimed just after Celery stores the outcome, so the result
    # can be read a moment before the history says the job finished.
    events = wait_for(
        lambda: ended_with_finished(celery_turnout.history(cluster.app, job.id)),
        timeout=5,
        what=f"job {job.id} to be recorded as finished",
    )
    assert "taken_over" not in events, events


def test_turnout_jobs_lists_a_running_job_with_its_owner_and_attempt(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    job = cluster.send("it.sleeper", 5.0)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)

    replies = cluster.inspect("turnout-jobs")

    listed = {name: reply["ok"] for name, reply in replies.items()}
    assert set(listed) == {w.name for w in cluster.workers}
    (entry,) = [j for j in listed[owner.name] if j["id"] == job.id]
    assert entry["task"] == "it.sleeper"
    assert entry["attempt"] == 1
    assert entry["owner"] == owner.name
    assert abs(entry["started"] - first["time"]) < 2.0
    assert entry["proven"] is None or entry["proven"] >= entry["started"] - 1.0
    for other in cluster.others(owner):
        assert all(j["id"] != job.id for j in listed[other.name])


def test_a_pool_kept_busy_by_long_jobs_causes_no_takeover(cluster: Cluster) -> None:
    cluster.start(2, concurrency=1)
    seconds = 5 * cluster.interval

    busy = [cluster.send("it.spinner", seconds) for _ in cluster.workers]
    waiting = cluster.send("it.sleeper", 0.5)
    for job in busy:
        cluster.wait_started(job.id)
    assert {cluster.records.started(j.id)["worker"] for j in busy} == {
        w.name for w in cluster.workers
    }

    for job in [*busy, waiting]:
        assert job.get(timeout=seconds + 30)["attempt"] == 1
    for job in [*busy, waiting]:
        assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1]
        events = [e["event"] for e in celery_turnout.history(cluster.app, job.id)]
        assert "taken_over" not in events, events


def test_a_job_is_covered_by_supervision_within_one_interval_and_a_grace(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    job = cluster.send("it.sleeper", 3.0)
    first = cluster.wait_started(job.id)
    grace = cluster.app.conf.get("turnout_grace") or cluster.interval / 2

    covered = wait_for(
        lambda: [
            e
            for e in celery_turnout.history(cluster.app, job.id)
            if e["event"] == "covered"
        ],
        timeout=10,
        what=f"job {job.id} to be covered",
    )

    assert covered[0]["attempt"] == 1
    assert covered[0]["at"] - first["time"] <= cluster.interval + grace + COVER_SLACK


def test_a_busy_worker_reserves_no_more_jobs_than_its_prefetch_window(
    cluster: Cluster,
) -> None:
    # With one pool process and a prefetch multiplier of 1, the worker runs one
    # job and reserves one more. The reserved job is acknowledged at its first
    # tick; without a withheld slot every later tick would let one more in.
    (busy,) = cluster.start(1, concurrency=1)
    seconds = 12 * cluster.interval
    jobs = [cluster.send("it.sleeper", seconds) for _ in range(4)]

    def admitted_by(worker_name: str) -> set[str]:
        return {
            job.id
            for job in jobs
            if any(
                e["event"] == "started" and e["worker"] == worker_name
                for e in celery_turnout.history(cluster.app, job.id)
            )
        }

    # The filesystem transport orders messages sent in the same millisecond at
    # random, so which two jobs the busy worker takes is not asserted.
    wait_for(
        lambda: len(admitted_by(busy.name)) == 2,
        timeout=10 * cluster.interval,
        what=f"{busy.name} to take one job and reserve a second",
    )
    assert stays_false(
        lambda: len(admitted_by(busy.name)) > 2, duration=4 * cluster.interval
    ), f"{busy.name} reserved {admitted_by(busy.name)} with one pool process"
    taken = admitted_by(busy.name)

    (idle,) = cluster.start(1, concurrency=1)
    for job in jobs:
        assert job.get(timeout=4 * seconds + 30)["attempt"] == 1

    # The two jobs the busy worker left in the queue: the idle worker takes one
    # at once; the last may go to either, as both have room once a job ends.
    ran_on = {job.id: cluster.records.started(job.id)["worker"] for job in jobs}
    assert {ran_on[job_id] for job_id in taken} == {busy.name}, ran_on
    left = [job.id for job in jobs if job.id not in taken]
    assert idle.name in {ran_on[job_id] for job_id in left}, ran_on


def test_a_job_that_celery_retries_runs_each_retry_once_as_its_next_attempt(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    job = cluster.send("it.retrier", 2, cluster.interval)

    outcome = job.get(timeout=30)

    assert outcome["attempt"] == 3
    starts = cluster.records.events(job.id, "start")
    assert [(r["attempt"], r["retries"]) for r in starts] == [(1, 0), (2, 1), (3, 2)]
    events = [e["event"] for e in celery_turnout.history(cluster.app, job.id)]
    assert "taken_over" not in events and "fenced" not in events, events
    assert cluster.app.AsyncResult(job.id).state == "SUCCESS"
