"""Jobs that kill their process run a bounded number of times, then fail clearly."""

from __future__ import annotations

import pytest
from celery import chain, chord
from harness import Cluster, stays_false, wait_for, wait_for_one_errback
from poison_jobs import POISON_TAKEOVERS
from test_faults import short_redelivery

import celery_turnout
from celery_turnout import JobExhausted

pytestmark = pytest.mark.integration


def test_a_job_that_kills_its_pool_process_once_runs_again_on_the_same_worker(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start(1, concurrency=2)
    neighbour = cluster.send("it.sleeper", 4.0)
    cluster.wait_started(neighbour.id)
    job = cluster.send("it.kills_its_pool_process_once")

    outcome = job.get(timeout=30)
    assert outcome == {"attempt": 2, "worker": worker.name}
    assert worker.process.poll() is None, "the worker itself must keep serving"
    events = [e["event"] for e in celery_turnout.history(cluster.app, job.id)]
    assert "child_lost" in events

    # The neighbour on the same worker was not charged for it.
    assert neighbour.get(timeout=30)["attempt"] == 1


def test_a_job_that_always_kills_its_pool_process_fails_after_its_takeovers(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start(1, concurrency=1)
    job = cluster.send("it.kills_its_pool_process")

    with pytest.raises(JobExhausted, match=job.id) as failure:
        job.get(timeout=60)
    assert "pool process" in str(failure.value)
    starts = cluster.records.events(job.id, "start")
    assert len(starts) == POISON_TAKEOVERS + 1
    assert worker.process.poll() is None


def test_a_job_that_kills_every_worker_it_runs_on_stops_and_fails_for_good(
    cluster: Cluster,
) -> None:
    # A job that kills its worker before the first tick covers it comes back
    # through the broker: on Redis only after the visibility timeout.
    short_redelivery(cluster)
    workers = cluster.start(POISON_TAKEOVERS + 2, concurrency=1)
    job = cluster.send("it.kills_its_worker")

    with pytest.raises(JobExhausted, match=job.id) as failure:
        job.get(timeout=60 + 20 * cluster.interval)
    message = str(failure.value)
    assert f"giving up after {POISON_TAKEOVERS} takeover(s)" in message
    assert "worker" in message
    assert len(cluster.records.events(job.id, "start")) == POISON_TAKEOVERS + 1
    survivors = [w for w in workers if w.process.poll() is None]
    assert len(survivors) == 1, "each attempt takes one worker down, no more"

    # Nothing restarts it afterwards, and FAILURE stays its final state.
    assert stays_false(
        lambda: len(cluster.records.events(job.id, "start")) > POISON_TAKEOVERS + 1,
        3 * cluster.interval,
    )
    assert cluster.app.AsyncResult(job.id).state == "FAILURE"


def test_a_job_that_exhausts_its_attempts_calls_its_errback_once(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start(1, concurrency=1)
    job = cluster.app.send_task(
        "it.kills_its_pool_process", link_error=cluster.app.signature("it.errback")
    )

    with pytest.raises(JobExhausted, match=job.id):
        job.get(timeout=60)
    wait_for_one_errback(cluster, job.id)
    assert worker.process.poll() is None


def test_a_chord_whose_header_holds_an_exhausted_job_fails_its_body(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start(1, concurrency=1)
    app = cluster.app
    header = [
        app.signature("it.kills_its_pool_process"),
        app.signature("it.sleeper", (0.2,)),
    ]
    body = chord(header, app=app)(app.signature("it.gather"))

    wait_for(
        lambda: body.state != "PENDING" and body.state,
        60,
        f"the chord body {body.id} to end",
    )
    assert body.state == "FAILURE"
    assert not cluster.records.events(body.id, "gather"), "the body must not run"
    assert worker.process.poll() is None


def test_a_chain_whose_first_job_is_exhausted_fails_its_later_steps(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start(1, concurrency=1)
    app = cluster.app
    last = chain(
        app.signature("it.kills_its_pool_process"),
        app.signature("it.sleeper", (0.2,), immutable=True),
        app=app,
    ).apply_async()

    with pytest.raises(JobExhausted):
        last.parent.get(timeout=60)
    wait_for(
        lambda: last.state != "PENDING" and last.state,
        10,
        f"the last step {last.id} of the chain to end",
    )
    assert last.state == "FAILURE"
    assert not cluster.records.events(last.id, "start"), "it must not run"
