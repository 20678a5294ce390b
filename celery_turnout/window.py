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

from .ledger import Ledger

logger = logging.getLogger(__name__)


class PrefetchWindow:
    """Withholds prefetch slots for acknowledged jobs that wait for a pool process.

    Every change goes through the consumer's QoS as a relative step, as
    Celery's own ETA and autoscaler adjustments do, so the two compose. The
    slots actually withheld are counted apart from those asked for, because
    the QoS clamps its value at one.

    Call :meth:`adjust` on the worker's main thread.
    """

    def __init__(self, consumer: Any, ledger: Ledger, hostname: str,
                 leaving: Callable[[], bool]) -> None:
        self.consumer = consumer
        self.ledger = ledger
        self.hostname = hostname
        self.leaving = leaving
        self._qos: Any = None
        self._task_consumer: Any = None
        #: Slots taken off the QoS value by this object.
        self.withheld = 0
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
        qos, task_consumer = self.consumer.qos, self.consumer.task_consumer
        if qos is None or task_consumer is None:
            return
        if qos is not self._qos or task_consumer is not self._task_consumer:
            # A new connection: Celery set the full window and consumes again.
            self._qos, self._task_consumer = qos, task_consumer
            self.withheld, self.paused = 0, False
        if _restoring(self.consumer):
            # After a reconnection Celery raises the window back step by step,
            # setting the QoS value outright on every acknowledgement: a slot
            # withheld now would be lost on the next step and given back twice.
            self.withheld = 0
        window = qos.value + self.withheld
        if not window:
            return  # a prefetch count of zero: the user asked for no limit
        waiting = self.waiting()
        if not _restoring(self.consumer):
            self._withhold(qos, min(waiting, window - 1))
        full = waiting >= window
        if full and not self.paused:
            self._pause(task_consumer, waiting)
        elif not full and self.paused and not self.leaving():
            self._resume(task_consumer)

    def _withhold(self, qos: Any, slots: int) -> None:
        before = qos.value
        if slots > self.withheld:
            qos.decrement_eventually(slots - self.withheld)
        elif slots < self.withheld:
            qos.increment_eventually(self.withheld - slots)
        self.withheld += before - qos.value

    def _pause(self, task_consumer: Any, waiting: int) -> None:
        task_consumer.cancel()
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


def _restoring(consumer: Any) -> bool:
    # Celery's consumer keeps this flag false while it restores a prefetch
    # count it reduced after a reconnection (worker_enable_prefetch_count_reduction).
    return getattr(consumer, '_maximum_prefetch_restored', True) is False
