"""A worker that is told to stop hands its jobs off instead of dying with them.

A warm shutdown (SIGTERM) hands them off at once or, with ``turnout_shutdown =
'wait'``, lets them finish. A cold shutdown (SIGQUIT) in either mode first
waits out Celery's soft shutdown (``worker_soft_shutdown_timeout``), then hands
them off, and the worker exits soon after.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Cluster, Worker, stays_false, wait_for
from test_failover import a_covered_job, events_of

pytestmark = pytest.mark.integration

#: Seconds from SIGTERM to the next attempt's start, well inside the grace
#: period an orchestrator typically gives (30 s).
HANDOFF_BOUND = 5.0


def running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
    # The pool process that ran the old copy is gone with its worker.
    wait_for(
        lambda: not running(first["pid"]),
        5,
        f"pool process {first['pid']} of attempt 1 to exit",
    )

    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["attempt"] == 2
    assert not cluster.records.events(job.id, "finish", attempt=1)
    events = events_of(cluster, job.id)
    assert ("handed_off", 2) in events
    assert ("taken_over", 2) not in events, "the exit was mistaken for a crash"


@pytest.mark.transports("redis", "rabbitmq")
def test_a_worker_killed_just_after_its_warm_hand_off_loses_no_job(
    cluster: Cluster,
) -> None:
    # An orchestrator's SIGKILL can follow its SIGTERM within a second. The
    # leaving worker must not be the one that fetches the copy it handed off.
    cluster.start(2)
    seconds = 4.0
    job, first, owner = a_covered_job(cluster, seconds)

    owner.signal(signal.SIGTERM)
    wait_for(
        lambda: ("handed_off", 2) in events_of(cluster, job.id),
        HANDOFF_BOUND,
        f"{owner.name} to hand job {job.id} off",
    )
    owner.kill()

    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["attempt"] == 2
    assert outcome["worker"] in {w.name for w in cluster.others(owner)}


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


#: Celery's ``worker_soft_shutdown_timeout`` in the cold-shutdown tests, longer
#: than one supervise interval: ticks go on while Celery waits it out.
SOFT_SHUTDOWN = 2.0

#: Seconds a worker may take past its soft shutdown to stop its jobs, hand them
#: off and exit. A worker that waits for its jobs instead takes about as long
#: as COLD_JOB_SECONDS.
COLD_EXIT_SLACK = 4.0

#: How long the jobs of the cold-shutdown tests run.
COLD_JOB_SECONDS = 10.0


def cold_cluster(cluster: Cluster, mode: str, remap_sigterm: bool = False) -> None:
    """Set ``turnout_shutdown`` and a soft shutdown, then start two workers.

    With ``remap_sigterm``, SIGTERM starts a cold shutdown, as Celery's
    ``REMAP_SIGTERM=SIGQUIT`` makes it do.
    """
    cluster.env["TURNOUT_IT_SHUTDOWN"] = mode
    cluster.env["TURNOUT_IT_SOFT_SHUTDOWN_TIMEOUT"] = str(SOFT_SHUTDOWN)
    if remap_sigterm:
        cluster.env["REMAP_SIGTERM"] = "SIGQUIT"
    cluster.start(2)


def an_acknowledged_job(
    cluster: Cluster, seconds: float
) -> tuple[Any, dict[str, Any], Worker]:
    """Like ``a_covered_job``, and its message is acknowledged too.

    The supervision thread covers a job; the owner's main thread acknowledges
    its message a moment later.
    """
    job, first, owner = a_covered_job(cluster, seconds)

    def acknowledged() -> bool:
        replies = cluster.app.control.inspect([owner.name], timeout=1).active()
        active = (replies or {}).get(owner.name, [])
        return any(r["id"] == job.id and r["acknowledged"] for r in active)

    wait_for(acknowledged, 10, f"the message of job {job.id} to be acknowledged")
    return job, first, owner


def seconds_to_exit(worker: Worker, since: float) -> float:
    """Wait until ``worker`` exits within the cold-shutdown bound; return when."""
    wait_for(
        lambda: worker.process.poll() is not None,
        SOFT_SHUTDOWN + COLD_EXIT_SLACK,
        f"worker {worker.name} to exit after its soft shutdown",
    )
    return time.time() - since


def assert_finished_elsewhere_as_attempt_two(
    cluster: Cluster, job: Any, owner: Worker
) -> dict[str, Any]:
    """Attempt 2 ran on a peer and gave the result; attempt 1 never finished."""
    outcome: dict[str, Any] = job.get(timeout=COLD_JOB_SECONDS + 30)
    assert outcome["attempt"] == 2
    assert outcome["worker"] in {w.name for w in cluster.others(owner)}
    assert not cluster.records.events(job.id, "finish", attempt=1)
    assert len(cluster.records.events(job.id, "start", attempt=2)) == 1
    return outcome


@pytest.mark.transports("redis", "rabbitmq")
@pytest.mark.parametrize(
    ("mode", "signum"),
    [
        ("handoff", signal.SIGQUIT),
        ("wait", signal.SIGQUIT),
        ("wait", signal.SIGTERM),  # with REMAP_SIGTERM=SIGQUIT
    ],
    ids=["handoff-SIGQUIT", "wait-SIGQUIT", "wait-remapped-SIGTERM"],
)
def test_a_cold_shutdown_hands_an_acknowledged_job_off_after_its_soft_shutdown(
    cluster: Cluster, mode: str, signum: int, figure: Callable[[str], None]
) -> None:
    cold_cluster(cluster, mode, remap_sigterm=signum == signal.SIGTERM)
    job, first, owner = an_acknowledged_job(cluster, COLD_JOB_SECONDS)

    asked_at = owner.signal(signum)
    exited = seconds_to_exit(owner, asked_at)
    second = cluster.wait_started(job.id, attempt=2, timeout=COLD_EXIT_SLACK)
    figure(
        f"{cluster.broker_name}, {mode}: {signal.Signals(signum).name} with a "
        f"{SOFT_SHUTDOWN:g} s soft "
        f"shutdown to attempt 2 started {second['time'] - asked_at:.2f} s, "
        f"worker exited {exited:.2f} s"
    )
    # The job had its soft shutdown to finish in before it was stopped.
    assert second["time"] - asked_at >= SOFT_SHUTDOWN

    assert_finished_elsewhere_as_attempt_two(cluster, job, owner)
    events = events_of(cluster, job.id)
    assert ("handed_off", 2) in events
    assert ("taken_over", 2) not in events, "the exit was mistaken for a crash"


@pytest.mark.transports("redis", "rabbitmq")
@pytest.mark.parametrize("mode", ["handoff", "wait"])
def test_a_job_a_cold_shutdown_stops_before_its_acknowledgement_comes_back(
    cluster: Cluster, mode: str, figure: Callable[[str], None]
) -> None:
    cold_cluster(cluster, mode)
    job = cluster.send("it.sleeper", COLD_JOB_SECONDS)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)

    # Most often the job is not yet covered: a tick covers it while Celery waits
    # out its soft shutdown, but the acknowledgement waits for the main thread,
    # which Celery holds; then Celery stops the copy and leaves its message to
    # the broker, and that message must not be acknowledged after all.
    asked_at = owner.signal(signal.SIGQUIT)
    exited = seconds_to_exit(owner, asked_at)
    second = cluster.wait_started(job.id, attempt=2, timeout=COLD_EXIT_SLACK)
    left_to_broker = "before its message was acknowledged" in owner.log()
    figure(
        f"{cluster.broker_name}, {mode}: SIGQUIT on a job "
        f"{'not yet acknowledged' if left_to_broker else 'already acknowledged'} "
        f"to attempt 2 started {second['time'] - asked_at:.2f} s, "
        f"worker exited {exited:.2f} s"
    )
    assert_finished_elsewhere_as_attempt_two(cluster, job, owner)


@pytest.mark.transports("redis", "rabbitmq")
def test_a_worker_waiting_for_its_jobs_hands_them_off_when_a_cold_shutdown_follows(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cold_cluster(cluster, "wait")
    job, first, owner = an_acknowledged_job(cluster, COLD_JOB_SECONDS)

    owner.signal(signal.SIGTERM)
    assert stays_false(lambda: owner.process.poll() is not None, cluster.interval)
    asked_at = owner.signal(signal.SIGQUIT)
    exited = seconds_to_exit(owner, asked_at)
    figure(
        f"{cluster.broker_name}, wait: SIGTERM, then SIGQUIT: worker exited "
        f"{exited:.2f} s after SIGQUIT"
    )
    assert_finished_elsewhere_as_attempt_two(cluster, job, owner)
    assert ("handed_off", 2) in events_of(cluster, job.id)
