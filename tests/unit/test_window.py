"""The prefetch window withholds a slot for each acknowledged job that waits.

These tests drive kombu's own QoS object, whose value is what the worker's
event loop sends to the broker as its prefetch count.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery.worker import state as worker_state
from kombu.common import QoS

from celery_turnout.ledger import HeldJob, Ledger
from celery_turnout.window import PrefetchWindow


class TaskConsumer:
    """Counts how often consumption is stopped and started."""

    def __init__(self) -> None:
        self.queues = ["jobs"]
        self.consuming = True
        self.cancels = 0
        self.consumes = 0

    def consuming_from(self, queue: str) -> bool:
        return self.consuming and queue in self.queues

    def cancel(self) -> None:
        self.consuming = False
        self.cancels += 1

    def consume(self) -> None:
        self.consuming = True
        self.consumes += 1


class Worker:
    """A consumer with a prefetch window, a ledger and an adjustable shutdown flag."""

    def __init__(self, prefetch: int) -> None:
        self.sent: list[int] = []
        self.consumer = SimpleNamespace(
            qos=QoS(lambda prefetch_count: self.sent.append(prefetch_count), prefetch),
            task_consumer=TaskConsumer(),
            initial_prefetch_count=prefetch,
        )
        self.ledger = Ledger()
        self.is_leaving = False
        self.window = PrefetchWindow(
            self.consumer, self.ledger, 'w1', lambda: self.is_leaving,
        )
        self._ids = iter(range(1000))

    def admit(self, *, acknowledged: bool, started: bool = False) -> HeldJob:
        job = HeldJob(f'job-{next(self._ids)}', 'long', 1, 'copy')
        job.request = SimpleNamespace(acknowledged=acknowledged)
        job.started = 1.0 if started else None
        self.ledger.add(job)
        return job

    @property
    def prefetch(self) -> int:
        return self.consumer.qos.value

    @property
    def consuming(self) -> bool:
        return self.consumer.task_consumer.consuming


def test_each_acknowledged_job_that_waits_takes_one_slot() -> None:
    worker = Worker(prefetch=4)
    worker.admit(acknowledged=True, started=True)
    worker.admit(acknowledged=False)
    worker.admit(acknowledged=True)
    worker.admit(acknowledged=True)

    worker.window.adjust()

    # Running and unacknowledged jobs are the broker's to count.
    assert worker.prefetch == 2
    assert worker.consuming


def test_a_started_job_gives_its_slot_back() -> None:
    worker = Worker(prefetch=4)
    first = worker.admit(acknowledged=True)
    worker.admit(acknowledged=True)
    worker.window.adjust()
    assert worker.prefetch == 2

    first.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 3


def test_a_full_window_stops_consumption_until_a_job_starts() -> None:
    worker = Worker(prefetch=2)
    first = worker.admit(acknowledged=True)
    worker.admit(acknowledged=True)

    worker.window.adjust()
    worker.window.adjust()

    # The QoS cannot go below one: consuming must stop instead, once.
    assert worker.prefetch == 1
    assert not worker.consuming
    assert worker.consumer.task_consumer.cancels == 1

    first.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 1
    assert worker.consuming


def test_released_and_finished_jobs_free_their_slots() -> None:
    worker = Worker(prefetch=3)
    fenced = worker.admit(acknowledged=True)
    finished = worker.admit(acknowledged=True)
    worker.window.adjust()
    assert worker.prefetch == 1

    fenced.released = 'fenced'
    worker.ledger.discard(finished)
    worker.window.adjust()

    assert worker.prefetch == 3


class Scheduled:
    """A request that waits for its ETA in Celery's timer."""


@pytest.fixture
def scheduled() -> Iterator[list[Scheduled]]:
    """Requests put in Celery's set of scheduled requests, removed afterwards."""
    requests: list[Scheduled] = []
    yield requests
    for request in requests:
        worker_state.scheduled_requests.discard(request)


def schedule(requests: list[Scheduled], qos: QoS) -> Scheduled:
    """Do what Celery does when a job with an ETA arrives."""
    request = Scheduled()
    requests.append(request)
    worker_state.scheduled_requests.add(request)
    qos.increment_eventually()
    return request


def run_eta(requests: list[Scheduled], request: Scheduled, qos: QoS) -> None:
    """Do what Celery does when the ETA comes: the job joins the reserved ones."""
    worker_state.scheduled_requests.discard(request)
    qos.decrement_eventually()


def test_a_job_waiting_for_its_eta_takes_no_slot(scheduled) -> None:
    worker = Worker(prefetch=2)
    job = worker.admit(acknowledged=True)
    eta = schedule(scheduled, worker.consumer.qos)

    worker.window.adjust()

    # Celery's extra slot for the ETA job and the slot the acknowledged job
    # gave back cancel out: one job waits, one more may come.
    assert worker.prefetch == 2
    assert worker.consuming

    run_eta(scheduled, eta, worker.consumer.qos)
    job.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 2


def test_celerys_steps_clamped_at_one_do_not_make_the_window_grow(scheduled) -> None:
    worker = Worker(prefetch=1)
    running = worker.admit(acknowledged=True, started=True)
    waiting = worker.admit(acknowledged=True)
    worker.window.adjust()
    assert worker.prefetch == 1 and not worker.consuming

    # An ETA job arrives and comes due while the QoS sits at its floor of one:
    # kombu clamps Celery's decrement, and only its increment counts.
    eta = schedule(scheduled, worker.consumer.qos)
    worker.window.adjust()
    run_eta(scheduled, eta, worker.consumer.qos)
    worker.window.adjust()
    worker.ledger.discard(running)
    waiting.started = 3.0
    worker.window.adjust()

    assert worker.prefetch == 1
    assert worker.consuming


def test_a_full_window_stops_consuming_again_after_add_consumer() -> None:
    worker = Worker(prefetch=1)
    worker.admit(acknowledged=True)
    worker.window.adjust()
    assert not worker.consuming

    # Celery's add_consumer control command makes the consumer consume again.
    worker.consumer.task_consumer.consume()
    worker.window.adjust()

    assert not worker.consuming
    assert worker.consumer.task_consumer.cancels == 2


def test_an_unlimited_window_is_left_alone() -> None:
    worker = Worker(prefetch=0)
    for _ in range(3):
        worker.admit(acknowledged=True)

    worker.window.adjust()

    assert worker.prefetch == 0
    assert worker.consuming


def test_a_new_connection_starts_from_celerys_full_window() -> None:
    worker = Worker(prefetch=2)
    job = worker.admit(acknowledged=True)
    worker.admit(acknowledged=True)
    worker.window.adjust()
    assert not worker.consuming

    # Reconnecting gives the worker a new QoS and a consuming task consumer.
    worker.consumer.qos = QoS(worker.sent.append, 2)
    worker.consumer.task_consumer = TaskConsumer()
    job.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 1
    assert worker.consuming


def test_celerys_restore_after_a_reconnection_is_corrected_at_the_next_step() -> None:
    worker = Worker(prefetch=4)
    worker.admit(acknowledged=True)
    worker.window.adjust()
    assert worker.prefetch == 3

    # Celery sets the value outright while it restores a reduced window.
    worker.consumer.qos.value = 4
    worker.window.adjust()

    assert worker.prefetch == 3


def test_a_leaving_worker_is_not_made_to_consume_again() -> None:
    worker = Worker(prefetch=1)
    job = worker.admit(acknowledged=True)
    worker.window.adjust()
    assert not worker.consuming

    worker.is_leaving = True
    job.started = 2.0
    worker.window.adjust()

    assert not worker.consuming
