"""A cancelled or revoked job stops and never comes back, even when its owner dies."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import (
    APP_DIR,
    Cluster,
    celery_cli,
    stays_false,
    wait_for,
    worker_environment,
)

import celery_turnout

pytestmark = pytest.mark.integration

#: Seconds to watch for a takeover that must not come: a detection bound at a
#: 1 s interval, plus the time a re-dispatched copy needs to start.
NO_TAKEOVER_WATCH = 5.0


def wait_until_covered(cluster: Cluster, job_id: str) -> None:
    """Wait until supervision covers the job, so that a takeover could find it."""
    wait_for(
        lambda: any(
            e["event"] == "covered" for e in celery_turnout.history(cluster.app, job_id)
        ),
        timeout=3 * cluster.interval + 5,
        what=f"job {job_id} to be covered by supervision",
    )


def test_a_cancelled_job_stops_and_never_comes_back_after_its_owner_dies(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    job = cluster.send("it.counter", 40, 0.25)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)

    printed = celery_cli(
        cluster.env, "turnout", "cancel", job.id, "--reason", "the operator said so"
    )
    assert f"Cancelled job {job.id}" in printed
    wait_for(lambda: job.state == "REVOKED", 10, f"job {job.id} to show REVOKED")
    steps = len(cluster.records.events(job.id, "step"))
    assert stays_false(
        lambda: len(cluster.records.events(job.id, "step")) > steps + 1, 1.5
    ), "the cancelled copy kept running"

    owner.kill()
    assert stays_false(
        lambda: cluster.records.started(job.id, attempt=2), NO_TAKEOVER_WATCH
    ), "a takeover ran the cancelled job again"
    assert job.state == "REVOKED"
    assert celery_turnout.cancelled(cluster.app, job.id) == "the operator said so"
    if cluster.broker_name != "filesystem":
        # Celery's file:// backend rewrites results in place: its own revoke
        # handler may read PENDING meanwhile and store its own reason.
        assert "the operator said so" in str(job.result)
    events = [e["event"] for e in celery_turnout.history(cluster.app, job.id)]
    assert "cancelled" in events and "finished" not in events

    watch = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "turnout", "watch", job.id],
        env=worker_environment(cluster.env), cwd=APP_DIR, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert watch.returncode == 1, watch.stdout + watch.stderr
    assert "REVOKED" in watch.stdout


def test_a_terminating_revoke_is_as_durable_as_a_cancel(cluster: Cluster) -> None:
    cluster.start(2)
    job = cluster.send("it.counter", 40, 0.25)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)

    cluster.app.control.revoke(job.id, terminate=True, signal="SIGKILL")
    wait_for(
        lambda: celery_turnout.history(cluster.app, job.id)[-1]["event"] == "revoked",
        timeout=10,
        what=f"the owner of {job.id} to record the revoke",
    )
    steps = len(cluster.records.events(job.id, "step"))
    assert stays_false(
        lambda: len(cluster.records.events(job.id, "step")) > steps + 1, 1.5
    ), "the revoked copy kept running"
    owner.kill()
    assert stays_false(
        lambda: cluster.records.started(job.id, attempt=2), NO_TAKEOVER_WATCH
    ), "a takeover ran the revoked job again"
    assert job.state == "REVOKED"
