"""A worker killed right before or after any step of the protocol loses no job.

Each test sets ``TURNOUT_FAULT`` for one worker only, so that it dies at that
step exactly as a crash would, and then checks that the job still finishes once,
and that no attempt number ever started twice: two starts of one attempt would be
two unfenced copies. The filesystem transport is left out: it never returns a
dead worker's unacknowledged messages, so a crash before a job is covered loses
that job there by design of the transport.
"""

from __future__ import annotations

import signal
from collections import Counter
from typing import Any

import pytest
from harness import Cluster, Worker, wait_for
from test_failover import wait_until_covered

import celery_turnout

pytestmark = [pytest.mark.integration, pytest.mark.transports("redis", "rabbitmq")]

#: Seconds for a job whose owner died to finish elsewhere: a takeover, or on
#: Redis the return of an unacknowledged message after the visibility timeout.
RECOVERY = 40.0

#: Redis returns a dead consumer's messages after this many seconds (tests only).
VISIBILITY_TIMEOUT = 6


def start_with_fault(cluster: Cluster, point: str) -> Worker:
    """Start one worker that dies when it reaches ``point``."""
    cluster.env["TURNOUT_FAULT"] = point
    try:
        (worker,) = cluster.start(1)
    finally:
        del cluster.env["TURNOUT_FAULT"]
    return worker


def short_redelivery(cluster: Cluster) -> None:
    """Let Redis return a dead worker's messages within seconds, not an hour."""
    if cluster.broker_name == "redis":
        cluster.set_transport_options(
            visibility_timeout=VISIBILITY_TIMEOUT,
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
            # Every worker of the DB takes this lock to restore messages; one
            # killed while holding it blocks restores until the lock expires.
            unacked_mutex_expire=VISIBILITY_TIMEOUT,
        )


def wait_for_exit(worker: Worker, timeout: float) -> None:
    """Wait until the faulty worker's main process is gone."""
    wait_for(
        lambda: worker.process.poll() is not None, timeout, f"{worker.name} to die"
    )


def starts_by_attempt(cluster: Cluster, job_id: str) -> Counter[int]:
    """How many times each attempt of a job started."""
    return Counter(r["attempt"] for r in cluster.records.events(job_id, "start"))


def assert_ran_once_per_attempt(cluster: Cluster, job: Any, seconds: float) -> dict:
    outcome: dict[str, Any] = job.get(timeout=seconds + RECOVERY)
    starts = starts_by_attempt(cluster, job.id)
    assert all(count == 1 for count in starts.values()), f"attempt ran twice: {starts}"
    assert starts[outcome["attempt"]] == 1
    return outcome


@pytest.mark.parametrize("point", [
    "admit.after_claim",
    "tick.after_supervise",
    "tick.after_monitor",
    "tick.after_purge",
])
def test_an_owner_dying_at_a_supervision_step_loses_no_job(
    cluster: Cluster, point: str
) -> None:
    short_redelivery(cluster)
    owner = start_with_fault(cluster, point)
    job = cluster.send("it.sleeper", 3.0)
    wait_for_exit(owner, 10)
    cluster.start(2)

    outcome = assert_ran_once_per_attempt(cluster, job, 3.0)
    assert outcome["worker"] != owner.name
    assert outcome["attempt"] == 2


def test_an_owner_dying_between_storing_the_outcome_and_claiming_completion_keeps_it(
    cluster: Cluster,
) -> None:
    short_redelivery(cluster)
    owner = start_with_fault(cluster, "finish.before_claim")
    job = cluster.send("it.sleeper", 2.0)
    first = cluster.wait_started(job.id)
    wait_for_exit(owner, 15)
    peers = cluster.start(2)

    outcome: dict[str, Any] = job.get(timeout=RECOVERY)
    assert outcome["attempt"] == 1 and outcome["worker"] == first["worker"]
    # Detection re-dispatches the job; admission finds its stored outcome.
    wait_for(
        lambda: any("already finished" in w.log() for w in peers)
        or starts_by_attempt(cluster, job.id)[2],
        2 * cluster.interval + RECOVERY / 4,
        "the re-dispatched copy to be dropped",
    )
    assert starts_by_attempt(cluster, job.id) == Counter({1: 1})
    history = celery_turnout.history(cluster.app, job.id)
    second = [e for e in history if e["attempt"] == 2]
    # A takeover's event may follow the start it caused in the history.
    assert "started" in [e["event"] for e in second], second
    assert second[-1]["event"] == "finished", second
    assert "did not run" in second[-1]["reason"]


@pytest.mark.parametrize("point", ["check.after_fence", "check.after_redispatch"])
def test_a_checker_dying_in_the_middle_of_a_takeover_loses_and_doubles_nothing(
    cluster: Cluster, point: str
) -> None:
    # The checker may receive the copy it re-dispatched before it dies; on
    # Redis that copy comes back after the visibility timeout.
    short_redelivery(cluster)
    seconds = 10.0
    (owner,) = cluster.start(1)
    job = cluster.send("it.sleeper", seconds)
    cluster.wait_started(job.id)
    wait_until_covered(cluster, job.id)
    checker = start_with_fault(cluster, point)
    assert not cluster.records.events(job.id, "finish"), "too slow a start"

    owner.kill()
    wait_for_exit(checker, 10 * cluster.interval)
    cluster.start(1)

    outcome = assert_ran_once_per_attempt(cluster, job, seconds)
    # Attempt 3 when the dead checker had admitted attempt 2 itself.
    assert outcome["attempt"] in (2, 3)


@pytest.mark.parametrize("point", ["handoff.after_stop", "handoff.after_redispatch"])
def test_a_worker_dying_half_way_through_its_hand_off_loses_and_doubles_nothing(
    cluster: Cluster, point: str
) -> None:
    seconds = 10.0
    leaving = start_with_fault(cluster, point)
    job = cluster.send("it.sleeper", seconds)
    cluster.wait_started(job.id)
    wait_until_covered(cluster, job.id)
    cluster.start(1)
    assert not cluster.records.events(job.id, "finish"), "too slow a start"

    leaving.signal(signal.SIGTERM)
    wait_for_exit(leaving, 15)

    outcome = assert_ran_once_per_attempt(cluster, job, seconds)
    assert outcome["attempt"] == 2
