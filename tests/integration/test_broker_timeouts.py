"""Long jobs outlive the broker's own limits on unacknowledged messages.

Each case shows, with a plain late-acking Celery task, that the lowered limit
really is hit by a job of that length, and that a turnout job of the same length
runs exactly once.

RabbitMQ 3.10 reads ``consumer_timeout`` when a channel opens and checks it on the
channel's tick, every ``channel_tick_interval`` (60 s by default), against the
oldest unacknowledged delivery only: a delivery is caught between the timeout and
the timeout plus one tick after it was delivered. The tests lower both, before the
workers connect, and restore them afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster, rabbitmqctl, wait_for

import celery_turnout

pytestmark = pytest.mark.integration

#: The lowered RabbitMQ consumer timeout and channel tick, in milliseconds.
CONSUMER_TIMEOUT_MS = 4000
CHANNEL_TICK_MS = 500

#: A job this long is caught by the lowered consumer timeout without turnout.
LONGER_THAN_CONSUMER_TIMEOUT = 2 * (CONSUMER_TIMEOUT_MS + CHANNEL_TICK_MS) / 1000

#: The lowered Redis visibility timeout, in seconds, and a job outliving it.
VISIBILITY_TIMEOUT = 3
LONGER_THAN_VISIBILITY_TIMEOUT = 8.0

RABBITMQ_LOGS = Path("/var/log/rabbitmq")
CONSUMER_TIMED_OUT = "timed out waiting for delivery acknowledgement"


def _rabbit_setting(key: str) -> str:
    return rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()


def _set_rabbit_setting(key: str, value: str) -> None:
    if value == "undefined":
        rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")
    else:
        rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")


@pytest.fixture
def short_consumer_timeout() -> Iterator[None]:
    """Lower RabbitMQ's consumer timeout and channel tick for this test only."""
    saved = {
        key: _rabbit_setting(key)
        for key in ("consumer_timeout", "channel_tick_interval")
    }
    try:
        _set_rabbit_setting("consumer_timeout", str(CONSUMER_TIMEOUT_MS))
        _set_rabbit_setting("channel_tick_interval", str(CHANNEL_TICK_MS))
        yield
    finally:
        for key, value in saved.items():
            # get_env answers {ok,Value} or undefined.
            plain = value[len("{ok,") : -1] if value.startswith("{ok,") else value
            _set_rabbit_setting(key, plain)


class RabbitLog:
    """The part of the RabbitMQ server log written since this object was made."""

    def __init__(self) -> None:
        """Remember how long each server log is now."""
        self.offsets = {
            path: path.stat().st_size for path in RABBITMQ_LOGS.glob("rabbit@*.log")
        }

    def since(self) -> str:
        """Return what the server logged since then."""
        text = []
        for path, offset in self.offsets.items():
            with path.open("rb") as log:
                log.seek(offset)
                text.append(log.read().decode(errors="replace"))
        return "".join(text)


@pytest.mark.transports("rabbitmq")
@pytest.mark.usefixtures("short_consumer_timeout")
def test_without_turnout_rabbitmq_closes_the_channel_of_a_long_late_acked_task(
    cluster: Cluster,
) -> None:
    cluster.start(1)

    job = cluster.send("it.plain_sleeper", LONGER_THAN_CONSUMER_TIMEOUT)
    cluster.wait_started(job.id, attempt=None)

    timeout = (CONSUMER_TIMEOUT_MS + 2 * CHANNEL_TICK_MS) / 1000 + 10
    cluster.wait_until_logged("PRECONDITION_FAILED", timeout)


@pytest.mark.transports("rabbitmq")
@pytest.mark.usefixtures("short_consumer_timeout")
def test_a_job_longer_than_the_rabbitmq_consumer_timeout_runs_once_on_one_channel(
    cluster: Cluster,
) -> None:
    server_log = RabbitLog()
    cluster.start(2)

    job = cluster.send("it.sleeper", LONGER_THAN_CONSUMER_TIMEOUT)
    outcome = job.get(timeout=LONGER_THAN_CONSUMER_TIMEOUT + 30)

    assert outcome["attempt"] == 1
    assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1]
    events = [e["event"] for e in celery_turnout.history(cluster.app, job.id)]
    assert events == ["started", "covered", "finished"], events
    for name, text in cluster.logs():
        assert "PRECONDITION_FAILED" not in text, name
        assert "Connection to broker lost" not in text, name
        # A redelivered job message would be dropped as a duplicate copy, and
        # a redelivered check that found a lane unread would take a job over.
        assert "is already held by copy" not in text, name
        assert "takes over" not in text, name
    assert CONSUMER_TIMED_OUT not in server_log.since()


@pytest.mark.transports("redis")
def test_past_the_redis_visibility_timeout_a_plain_task_runs_twice_and_a_job_once(
    cluster: Cluster,
) -> None:
    cluster.set_transport_options(
        visibility_timeout=VISIBILITY_TIMEOUT,
        unacked_restore_interval=1,
        unacked_restore_throttle=1,
        # A worker killed while it restores leaves kombu's restore lock behind
        # (5 minutes by default), and no worker on the database restores until
        # it expires.
        unacked_mutex_expire=VISIBILITY_TIMEOUT,
    )
    cluster.start(2)

    plain = cluster.send("it.plain_sleeper", LONGER_THAN_VISIBILITY_TIMEOUT)
    job = cluster.send("it.sleeper", LONGER_THAN_VISIBILITY_TIMEOUT)

    wait_for(
        lambda: len(cluster.records.events(plain.id, "start")) >= 2,
        LONGER_THAN_VISIBILITY_TIMEOUT,
        f"plain task {plain.id} to be restored and started again",
    )
    outcome = job.get(timeout=LONGER_THAN_VISIBILITY_TIMEOUT + 30)
    assert outcome["attempt"] == 1
    assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1]
    assert [r["attempt"] for r in cluster.records.events(job.id, "finish")] == [1]
