"""Progress and checkpoints of running jobs, seen from outside and across takeovers."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Cluster, wait_for

import celery_turnout

pytestmark = pytest.mark.integration


def listed_progress(cluster: Cluster, job_id: str) -> dict[str, Any] | None:
    """The progress ``inspect turnout-jobs`` shows for a job, if it lists it."""
    for reply in cluster.inspect("turnout-jobs").values():
        for entry in reply.get("ok", []):
            if entry["id"] == job_id and entry.get("progress"):
                progress: dict[str, Any] = entry["progress"]
                return progress
    return None


def test_progress_shows_in_inspect_and_in_the_result_backend(cluster: Cluster) -> None:
    cluster.start(1)
    job = cluster.send("it.counter", 8, 0.5)

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

    outcome = job.get(timeout=30)
    assert outcome["sum"] == sum(range(8))
    final = celery_turnout.progress(cluster.app, job.id)
    assert final is not None and final["done"] == 8, "the last value is flushed"
