"""Signals of turnout jobs, for hooks of your own, in the style of ``celery.signals``.

Connect a receiver as you would to one of Celery's signals::

    from celery_turnout.signals import job_taken_over

    @job_taken_over.connect
    def tell_the_on_call(sender, job_id, attempt, reason, **kwargs):
        ...

``sender`` is the job's task (the task object where the worker knows it, else
its name). Every signal passes ``job_id`` and ``attempt``; the others are listed
with each signal. A receiver that raises is logged and does not disturb the job.

Most signals are sent in the worker's main process, from its main thread,
where the fact is learnt: the owner for a start, a fence, a stall or a revoke,
and the worker that re-dispatched a job for a takeover. :data:`job_progress`
and :data:`job_checkpointed` are sent in the pool process that runs the job, on
each throttled write, so a receiver there sees what the job saw.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    'job_cancelled', 'job_checkpointed', 'job_fenced', 'job_finished',
    'job_progress', 'job_stalled', 'job_started', 'job_taken_over',
]

#: A pool process began running a copy of the job. Also passes ``worker``.
job_started = Signal(
    name='job_started', providing_args={'job_id', 'attempt', 'worker'},
)

#: The job reported progress (pool process, at most about once a second).
#: Also passes ``done``, ``total`` and ``note``.
job_progress = Signal(
    name='job_progress',
    providing_args={'job_id', 'attempt', 'done', 'total', 'note'},
)

#: The job saved a checkpoint (pool process). Also passes ``state``.
job_checkpointed = Signal(
    name='job_checkpointed', providing_args={'job_id', 'attempt', 'state'},
)

#: A worker re-dispatched the job as attempt ``attempt``. Also passes
#: ``cause`` (``'taken_over'``, ``'child_lost'``, ``'handed_off'`` or
#: ``'restarted'``), ``reason`` in words and ``worker``, the re-dispatcher.
job_taken_over = Signal(
    name='job_taken_over',
    providing_args={'job_id', 'attempt', 'cause', 'reason', 'worker'},
)

#: The owner learnt that another worker took the job over and stopped its
#: copy. Also passes ``worker`` (the owner), ``by`` and ``reason``.
job_fenced = Signal(
    name='job_fenced',
    providing_args={'job_id', 'attempt', 'worker', 'by', 'reason'},
)

#: The job's progress has not moved for its ``stall_timeout``. Also passes
#: ``worker``, ``seconds`` (how long it has not moved) and ``action``
#: (``'report'``, ``'restart'`` or ``'fail'``).
job_stalled = Signal(
    name='job_stalled',
    providing_args={'job_id', 'attempt', 'worker', 'seconds', 'action'},
)

#: A revoke stopped or discarded this worker's copy; the job is cancelled for
#: good. Also passes ``worker`` and ``reason``.
job_cancelled = Signal(
    name='job_cancelled', providing_args={'job_id', 'attempt', 'worker', 'reason'},
)

#: An attempt of the job ended with an outcome. Also passes ``worker`` and
#: ``state`` (``'SUCCESS'``, ``'FAILURE'`` or ``'REVOKED'``).
job_finished = Signal(
    name='job_finished', providing_args={'job_id', 'attempt', 'worker', 'state'},
)
