"""The prefetch window withholds a slot for each acknowledged job that waits.

These tests drive kombu's own QoS object, whose value is what the worker's
event loop sends to the broker as its prefetch count.
"""

from __future__ import annotations

from types import SimpleNamespace

from kombu.common import QoS

from celery_turnout.ledger import HeldJob, Ledger
from celery_turnout.window import PrefetchWindow


class TaskConsumer:
    """Counts how often consumption is stopped and started."""

    def __init__(self) -> None:
        self.consuming = True
        self.cancels = 0
        self.consumes = 0

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
    assert worker.window.withheld == 0


def test_the_window_composes_with_celerys_own_steps() -> None:
    worker = Worker(prefetch=4)
    job = worker.admit(acknowledged=True)
    worker.window.adjust()
    # Celery raises the window for a job with an ETA while it waits.
    worker.consumer.qos.increment_eventually()
    worker.window.adjust()
    assert worker.prefetch == 4

    job.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 5


def test_clamped_steps_are_not_given_back_twice() -> None:
    worker = Worker(prefetch=3)
    jobs = [worker.admit(acknowledged=True) for _ in range(5)]
    worker.window.adjust()
    assert worker.prefetch == 1
    assert worker.window.withheld == 2

    for job in jobs:
        job.started = 2.0
    worker.window.adjust()

    assert worker.prefetch == 3
    assert worker.consuming


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
    assert worker.window.withheld == 1


def test_a_leaving_worker_is_not_made_to_consume_again() -> None:
    worker = Worker(prefetch=1)
    job = worker.admit(acknowledged=True)
    worker.window.adjust()
    assert not worker.consuming

    worker.is_leaving = True
    job.started = 2.0
    worker.window.adjust()

    assert not worker.consuming


def test_nothing_is_withheld_while_celery_restores_its_window() -> None:
    worker = Worker(prefetch=4)
    worker.consumer._maximum_prefetch_restored = False
    worker.admit(acknowledged=True)
    worker.window.adjust()
    # Celery sets the value outright on each acknowledgement meanwhile.
    worker.consumer.qos.value = 4
    assert worker.window.withheld == 0

    worker.consumer._maximum_prefetch_restored = True
    worker.window.adjust()

    assert worker.prefetch == 3
    assert worker.window.withheld == 1
