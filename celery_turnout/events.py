"""Celery events and turnout signals about a job, sent by the worker's main process.

Each kind of news goes out twice: as a Celery event (``turnout-job-started``,
``turnout-job-progress``, ``turnout-job-taken-over``, ``turnout-job-fenced``,
``turnout-job-stalled``, ``turnout-job-cancelled``, ``turnout-job-finished``)
through the worker's own event dispatcher, so ``celery events`` and Flower see
it when the worker runs with ``-E``; and as the matching signal of
:mod:`celery_turnout.signals`. Both happen on the worker's main thread, which
owns the dispatcher: the supervision thread only queues them.

Every event carries ``uuid`` (the job id, as Celery's task events do),
``attempt`` and ``task``, plus the fields of its signal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from celery.utils.dispatch import Signal

from . import signals

if TYPE_CHECKING:
    from .supervision import Supervisor

logger = logging.getLogger(__name__)

#: The signal and the Celery event type of each kind of news.
KINDS: dict[str, tuple[Signal, str]] = {
    'started': (signals.job_started, 'turnout-job-started'),
    'progress': (signals.job_progress, 'turnout-job-progress'),
    'taken_over': (signals.job_taken_over, 'turnout-job-taken-over'),
    'fenced': (signals.job_fenced, 'turnout-job-fenced'),
    'stalled': (signals.job_stalled, 'turnout-job-stalled'),
    'cancelled': (signals.job_cancelled, 'turnout-job-cancelled'),
    'finished': (signals.job_finished, 'turnout-job-finished'),
}


def announce(
    supervisor: Supervisor, kind: str, job_id: str, attempt: int, task: str,
    **fields: Any,
) -> None:
    """Queue the news of ``kind`` for the worker's main thread (any thread).

    Args:
        supervisor: The worker's supervisor, which owns the main-thread queue.
        kind: A key of :data:`KINDS`.
        job_id: The job.
        attempt: The attempt the news is about.
        task: The job's task name.
        **fields: The extra fields of the event and arguments of the signal.
    """
    supervisor.call_soon(
        lambda: announce_now(supervisor, kind, job_id, attempt, task, **fields),
    )


def announce_now(
    supervisor: Supervisor, kind: str, job_id: str, attempt: int, task: str,
    **fields: Any,
) -> None:
    """Send the event and the signal of ``kind`` at once. Main thread only."""
    signal, event_type = KINDS[kind]
    sender = supervisor.app.tasks.get(task, task)
    signal.send(sender=sender, job_id=job_id, attempt=attempt, **fields)

    dispatcher = supervisor.event_dispatcher
    if not sends_job_events(dispatcher):
        return
    try:
        dispatcher.send(event_type, uuid=job_id, attempt=attempt, task=task, **fields)
    except Exception as exc:  # news is never worth disturbing a job for
        logger.warning(
            'Could not send event %s about job %s attempt %d from worker %s: %r.',
            event_type, job_id, attempt, supervisor.hostname, exc,
        )


def sends_job_events(dispatcher: Any) -> bool:
    """True if ``dispatcher`` sends turnout's events, not only worker heartbeats.

    A worker started without ``-E`` still has an enabled dispatcher for its
    heartbeats, limited to the ``worker`` group of events.
    """
    if dispatcher is None or not getattr(dispatcher, 'enabled', False):
        return False
    groups = getattr(dispatcher, 'groups', None)
    return not groups or 'turnout' in groups
