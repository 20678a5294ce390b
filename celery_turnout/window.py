"""Keep the task consumer's prefetch window honest about acknowledged jobs.

The broker delivers a worker at most its prefetch count of unacknowledged task
messages: Celery reserves that many jobs beyond the ones it runs and no more.
Turnout acknowledges a job at its first supervise tick, which may come long
before a pool process is free to take it. Each such job would free a slot, and
a busy worker would go on reserving jobs it cannot run while its peers idle.

:class:`PrefetchWindow` withholds one slot for every job that is acknowledged
but not yet started. The broker's prefetch count cannot go below one (zero
means unlimited), so when those jobs fill the whole window the worker stops
consuming task messages until a pool process takes one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state

from .ledger import Ledger

logger = logging.getLogger(__name__)


class PrefetchWindow:
    """Withholds prefetch slots for acknowledged jobs that wait for a pool process.

    The window Celery wants is its prefetch count plus one slot for each job
    that waits for its ETA (Celery raises the QoS value for those). Each call
    of :meth:`adjust` works the QoS value out anew from that window and the
    waiting jobs, so no step of Celery's that the QoS clamped at one can make
    it drift.

    Call :meth:`adjust` on the worker's main thread.
    """

    def __init__(self, consumer: Any, ledger: Ledger, hostname: str,
                 leaving: Callable[[], bool]) -> None:
        self.consumer = consumer
        self.ledger = ledger
        self.hostname = hostname
        self.leaving = leaving
        self._task_consumer: Any = None
        #: True while this object keeps the task consumer from consuming.
        self.paused = False

    def waiting(self) -> int:
        """Held jobs whose messages are acknowledged and that no process started."""
        return sum(
            1 for job in self.ledger.held()
            if job.started is None and job.request is not None
            and job.request.acknowledged
        )

    def adjust(self) -> None:
        """Bring the QoS value and consumption in line with the waiting jobs."""
        consumer = self.consumer
        qos, task_consumer = consumer.qos, consumer.task_consumer
        if qos is None or task_consumer is None:
            return
        if task_consumer is not self._task_consumer:
            # A new connection: Celery consumes again from the start.
            self._task_consumer, self.paused = task_consumer, False
        prefetch = consumer.initial_prefetch_count
        if not prefetch:
            return  # a prefetch count of zero: the user asked for no limit
        waiting = self.waiting()
        room = prefetch + len(worker_state.scheduled_requests) - waiting
        target = max(room, 1)
        if target > qos.value:
            qos.increment_eventually(target - qos.value)
        elif target < qos.value:
            qos.decrement_eventually(qos.value - target)
        if room <= 0:
            self._pause(task_consumer, waiting)
        elif self.paused and not self.leaving():
            self._resume(task_consumer)

    def _pause(self, task_consumer: Any, waiting: int) -> None:
        # Checked every time: Celery's add_consumer control command, for one,
        # makes the task consumer consume again.
        if any(task_consumer.consuming_from(q) for q in task_consumer.queues):
            task_consumer.cancel()
        if self.paused:
            return
        self.paused = True
        logger.info(
            'Worker %s stops taking task messages: %d acknowledged job(s) wait for '
            'a pool process and fill its prefetch window. It takes more when a '
            'process starts one of them; until then other workers get new jobs.',
            self.hostname, waiting,
        )

    def _resume(self, task_consumer: Any) -> None:
        task_consumer.consume()
        self.paused = False
        logger.info(
            'Worker %s takes task messages again: a pool process started one of '
            'its waiting jobs.', self.hostname,
        )
