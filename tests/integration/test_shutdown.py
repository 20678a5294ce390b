"""A worker that is told to stop hands its jobs off instead of dying with them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Cluster, stays_false, wait_for
from test_failover import a_covered_job, events_of

pytestmark = pytest.mark.integration

#: Seconds from SIGTERM to the next attempt's start. An orchestrator's grace
#: period is typically 30 s; a copy the leaving worker's own consumer had
#: already fetched is returned when that consumer closes, a second or two later.
HANDOFF_BOUND = 5.0


def test_a_warm_shutdown_hands_jobs_off_at_once(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cluster.start(2)
    seconds = 6.0
    job, first, owner = a_covered_job(cluster, seconds)

    asked_at = owner.signal(signal.SIGTERM)
    second = cluster.wait_started(job.id, attempt=2, timeout=HANDOFF_BOUND)
    figure(
        f"{cluster.broker_name}: SIGTERM to attempt 2 started "
        f"{second['time'] - asked_at:.2f} s"
    )
    assert second["worker"] in {w.name for w in cluster.others(owner)}
    wait_for(lambda: owner.process.poll() is not None, 15, "the owner to exit")

    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["attempt"] == 2
    assert not cluster.records.events(job.id, "finish", attempt=1)
    events = events_of(cluster, job.id)
    assert ("handed_off", 2) in events
    assert ("taken_over", 2) not in events, "the exit was mistaken for a crash"


def test_a_worker_set_to_wait_finishes_its_jobs_and_leaves_without_a_takeover(
    cluster: Cluster,
) -> None:
    cluster.env["TURNOUT_IT_SHUTDOWN"] = "wait"
    cluster.start(2)
    seconds = 4.0
    job, first, owner = a_covered_job(cluster, seconds)

    owner.signal(signal.SIGTERM)
    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert (outcome["attempt"], outcome["worker"]) == (1, owner.name)
    wait_for(lambda: owner.process.poll() is not None, 15, "the owner to exit")

    # Its last monitor messages come due after it left: no peer may read its
    # exit as a crash.
    (peer,) = cluster.others(owner)
    assert stays_false(
        lambda: "stopped reading its supervise lane" in peer.log(),
        3 * cluster.interval,
    ), peer.log()
    assert cluster.records.events(job.id, "start") == [first]


def test_a_worker_told_to_stop_as_it_resumes_from_a_pause_loses_no_job(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    seconds = 6.0
    job, first, owner = a_covered_job(cluster, seconds)

    # A pause shorter than the detection bound: no peer takes the job over
    # while it lasts, so the leaving worker alone must pass it on.
    os.killpg(owner.pid, signal.SIGSTOP)
    paused_until = time.monotonic() + 0.5 * cluster.interval
    wait_for(lambda: time.monotonic() >= paused_until, 5, "the end of the pause")
    os.killpg(owner.pid, signal.SIGCONT)
    owner.signal(signal.SIGTERM)

    second = cluster.wait_started(job.id, attempt=2, timeout=HANDOFF_BOUND)
    assert second["worker"] in {w.name for w in cluster.others(owner)}
    wait_for(lambda: owner.process.poll() is not None, 15, "the owner to exit")
    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["attempt"] == 2
    assert not cluster.records.events(job.id, "finish", attempt=1)
