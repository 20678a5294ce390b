"""A job survives the death or the long pause of the worker that owns it."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from harness import Cluster, stays_false, wait_for

import celery_turnout

pytestmark = pytest.mark.integration

#: Seconds allowed on top of interval + grace for a takeover to show: the
#: re-dispatch, its delivery to a live worker and the first record of the job.
TAKEOVER_SLACK = 1.0


def detection_bound(cluster: Cluster) -> float:
    """The promised delay from an owner's death to the next attempt's start."""
    grace = cluster.app.conf.get("turnout_grace") or cluster.interval / 2
    return cluster.interval + grace + TAKEOVER_SLACK


def wait_until_covered(cluster: Cluster, job_id: str) -> None:
    """Wait until supervision covers the job, so that a takeover can find it."""
    wait_for(
        lambda: any(
            e["event"] == "covered" for e in celery_turnout.history(cluster.app, job_id)
        ),
        timeout=3 * cluster.interval + 5,
        what=f"job {job_id} to be covered by supervision",
    )


def a_covered_job(cluster: Cluster, seconds: float) -> tuple[Any, dict[str, Any], Any]:
    """Send a sleeper job; return it, its first start and its owner once covered."""
    job = cluster.send("it.sleeper", seconds)
    first = cluster.wait_started(job.id)
    wait_until_covered(cluster, job.id)
    return job, first, cluster.owner_of(first)


def events_of(cluster: Cluster, job_id: str) -> list[tuple[str, int]]:
    """Return the (event, attempt) pairs of a job's history."""
    history = celery_turnout.history(cluster.app, job_id)
    return [(e["event"], e["attempt"]) for e in history]


def test_a_job_whose_owner_is_killed_finishes_on_another_worker_as_attempt_two(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cluster.start(2)
    seconds = 4.0
    job, first, owner = a_covered_job(cluster, seconds)
    wait_for(lambda: time.time() >= first["time"] + seconds / 2, seconds, "halfway")

    bound = detection_bound(cluster)
    killed_at = owner.kill()
    second = cluster.wait_started(job.id, attempt=2, timeout=bound + 10)

    delay = second["time"] - killed_at
    figure(
        f"{cluster.broker_name}: SIGKILL to attempt 2 started {delay:.2f} s "
        f"(bound {bound:.2f} s)"
    )
    assert second["worker"] in {w.name for w in cluster.others(owner)}
    assert delay <= bound

    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["job"] == job.id
    assert outcome["attempt"] == 2
    assert outcome["worker"] == second["worker"]
    assert ("taken_over", 2) in events_of(cluster, job.id)
    assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1, 2]


def test_a_retry_waiting_for_its_countdown_survives_the_death_of_its_worker(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    countdown = 8 * cluster.interval
    job = cluster.send("it.retrier", 1, countdown)

    def holder_of_the_retry() -> str | None:
        for event in celery_turnout.history(cluster.app, job.id):
            if event["event"] == "covered" and event["attempt"] == 2:
                return str(event["worker"])
        return None

    holder = wait_for(holder_of_the_retry, 3 * cluster.interval + 5, "the retry held")
    (owner,) = [w for w in cluster.workers if w.name == holder]
    owner.kill()

    outcome: dict[str, Any] = job.get(timeout=countdown + 30)
    assert outcome["worker"] != holder
    # The retry's copy never ran; the job's third attempt did, whether a
    # takeover sent it or the broker returned the retry's message (a kill just
    # after the cover and before the acknowledgement).
    starts = cluster.records.events(job.id, "start")
    assert [(r["attempt"], r["retries"]) for r in starts] == [(1, 0), (3, 1)]


def test_a_paused_owner_is_fenced_and_the_result_comes_from_the_next_attempt(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    cluster.start(2)
    seconds = 8.0
    job, first, owner = a_covered_job(cluster, seconds)

    bound = detection_bound(cluster)
    stopped_at = owner.stop()
    second = cluster.wait_started(job.id, attempt=2, timeout=bound + 10)
    owner.resume()
    figure(
        f"{cluster.broker_name}: SIGSTOP to attempt 2 started "
        f"{second['time'] - stopped_at:.2f} s"
    )
    assert second["worker"] in {w.name for w in cluster.others(owner)}

    outcome: dict[str, Any] = job.get(timeout=seconds + 30)
    assert outcome["attempt"] == 2

    # Unfenced, the first copy would have finished by now or soon after:
    # watch until then, and see that it neither finished nor overwrote the result.
    unfenced_finish = first["time"] + seconds + 2.0
    first_stopped = stays_false(
        lambda: cluster.records.events(job.id, "finish", attempt=1),
        max(0.0, unfenced_finish - time.time()),
    )
    figure(f"{cluster.broker_name}: the fenced first copy stopped: {first_stopped}")
    stored = cluster.app.AsyncResult(job.id).get(timeout=10)
    assert stored["attempt"] == 2, "the first attempt's late result overwrote it"
    assert ("fenced", 1) in events_of(cluster, job.id)


def control_queue_of(cluster: Cluster, worker: Any) -> str:
    """The name of a worker's control queue, from its log."""
    found = re.search(r"Turnout supervision started for worker (\S+):", worker.log())
    assert found, f"{worker.name} logged no supervision start"
    return f"{cluster.env['TURNOUT_IT_QUEUE_PREFIX']}.control.{found.group(1)}"


def queue_exists(cluster: Cluster, name: str) -> bool:
    """True while the broker keeps the queue.

    A Redis list exists only while it holds messages; the queue asked about
    here holds a fence notice. On RabbitMQ the passive declaration counts as a
    use of the queue and restarts its expiry: ask once, after it should be gone.
    """
    if cluster.broker_name == "redis":
        client = redis.Redis.from_url(cluster.env["TURNOUT_IT_BROKER_URL"])
        return bool(client.exists(name))
    with cluster.app.connection_for_write() as connection:
        try:
            connection.default_channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors:
            return False
        return True


@pytest.mark.transports("redis", "rabbitmq")
def test_an_owner_paused_until_its_control_queue_expired_is_fenced_on_resuming(
    cluster: Cluster, figure: Callable[[str], None]
) -> None:
    # The broker drops a control queue left unused for turnout_queue_expires,
    # and the fence notice in it: the resumed owner must learn of the takeover
    # all the same, or its copy runs on next to the new attempt.
    expires = 6.0
    cluster.env["TURNOUT_IT_QUEUE_EXPIRES"] = str(expires)
    cluster.start(2)
    seconds = 30.0
    job, first, owner = a_covered_job(cluster, seconds)
    control = control_queue_of(cluster, owner)

    stopped_at = owner.stop()
    cluster.wait_started(job.id, attempt=2, timeout=detection_bound(cluster) + 10)
    # The pause this test is about: longer than the queue is kept.
    wait_for(
        lambda: time.time() >= stopped_at + expires + 2 * cluster.interval,
        expires + 10,
        "the paused owner's queues to expire",
    )
    assert not queue_exists(cluster, control), f"{control} outlived its expiry"
    resumed_at = owner.resume()

    def first_copy_gone() -> bool:
        try:
            os.kill(first["pid"], 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(first_copy_gone, 3 * cluster.interval + 5, "the first copy to stop")
    figure(
        f"{cluster.broker_name}: SIGCONT to the first copy stopped "
        f"{time.time() - resumed_at:.2f} s (or less)"
    )
    assert ("fenced", 1) in events_of(cluster, job.id)
    assert job.get(timeout=seconds + 30)["attempt"] == 2
    assert not cluster.records.events(job.id, "finish", attempt=1)


@pytest.mark.transports("redis")
def test_the_queues_a_dead_worker_leaves_on_redis_expire(cluster: Cluster) -> None:
    cluster.start(2)
    job, first, owner = a_covered_job(cluster, 3.0)
    owner.kill()
    cluster.wait_started(job.id, attempt=2, timeout=detection_bound(cluster) + 10)
    job.get(timeout=40)

    # The takeover put a fence notice into the dead owner's control queue and
    # put its last supervise message back into its lane after reading it;
    # neither may stay in Redis for good.
    client = redis.Redis.from_url(cluster.env["TURNOUT_IT_BROKER_URL"])
    prefix = cluster.env["TURNOUT_IT_QUEUE_PREFIX"]
    keys = {key.decode(): client.ttl(key) for key in client.scan_iter(f"{prefix}.*")}
    controls = [key for key in keys if key.startswith(f"{prefix}.control.")]
    assert controls, f"no fence notice was left for the dead owner: {keys}"
    forever = {key: ttl for key, ttl in keys.items() if ttl < 0}
    assert not forever, f"queues without an expiry: {forever}"


@pytest.mark.transports("redis")
def test_a_dead_owner_is_taken_over_on_redis_with_a_global_key_prefix(
    cluster: Cluster,
) -> None:
    # kombu prefixes some Redis commands itself and not others: a check that
    # looked at the unprefixed key would find every lane empty.
    cluster.set_transport_options(global_keyprefix=f"turnout-it-{cluster.token}:")
    cluster.start(2)
    seconds = 6.0
    job, first, owner = a_covered_job(cluster, seconds)

    owner.kill()
    second = cluster.wait_started(
        job.id, attempt=2, timeout=detection_bound(cluster) + 10
    )

    assert second["worker"] in {w.name for w in cluster.others(owner)}
    assert job.get(timeout=seconds + 30)["attempt"] == 2
