"""Cancelling a job for good, and making Celery's revoke of a job durable.

Celery keeps revokes in the memory of the workers that heard them, so a job
revoked on its owner could come back through a takeover once the owner dies.
:func:`cancel` writes a cancel mark into the turnout store first: admission
refuses every later copy of the job, a takeover skips it, and a copy still
running can neither save progress nor checkpoints nor finish. Then it stops
the running copy with a terminating revoke, and stores ``REVOKED`` with the
reason in the result backend.

A plain ``app.control.revoke(job_id, terminate=True)`` is made just as durable
in the worker that stops the copy: the receiver of Celery's ``task_revoked``
signal below writes the same cancel mark.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Celery
from celery.backends.base import DisabledBackend
from celery.signals import task_revoked
from celery.states import READY_STATES, REVOKED

from .events import announce_now
from .messages import ATTEMPT_HEADER
from .store import store_for
from .supervision import supervisor_of

logger = logging.getLogger(__name__)


def cancel(app: Celery, job_id: str, reason: str = 'cancelled') -> bool:
    """Cancel a turnout job for good and stop its running copy.

    Durable across the death of the job's owner and worker restarts: no
    takeover or redelivery runs the job again.

    Args:
        app: The app the job belongs to.
        job_id: The job (its Celery task id).
        reason: Why, in words; stored as the ``REVOKED`` result's reason.

    Returns:
        False if the result backend already held the job's outcome, which the
        cancel leaves as it is; True otherwise.
    """
    store = store_for(app)
    store.cancel(job_id, reason)
    attempts = [int(event.get('attempt') or 0) for event in store.history(job_id)]
    store.log(job_id, {
        'event': 'cancelled', 'attempt': max(attempts, default=0),
        'worker': f'client@{socket.gethostname()}', 'at': time.time(),
        'reason': reason,
    })
    # REVOKED goes into the backend before the revoke goes out: workers that
    # do not hold the job then leave the state alone instead of storing
    # REVOKED with a reason of their own.
    ended = None
    if not isinstance(app.backend, DisabledBackend):
        ended = app.backend.get_task_meta(job_id, cache=False).get('status')
        if ended not in READY_STATES:
            app.backend.mark_as_revoked(job_id, reason)
    app.control.revoke(job_id, terminate=True, signal='SIGKILL')

    if ended in READY_STATES:
        logger.info(
            'Job %s had already ended %s; it is marked cancelled all the same '
            '(%s).', job_id, ended, reason,
        )
        return False
    logger.info('Job %s is cancelled (%s) and stored as %s.', job_id, reason, REVOKED)
    return True


@task_revoked.connect(weak=False)
def _make_revoke_durable(
    sender: Any = None, request: Any = None, terminated: bool = False,
    expired: bool = False, **_: Any,
) -> None:
    # Sent in the worker's main process when a revoke stops a running copy or
    # discards a waiting one.
    from .task import TurnoutTask

    if not isinstance(sender, TurnoutTask) or request is None:
        return
    supervisor = supervisor_of(sender.app)
    if supervisor is None:
        return
    job_id = request.id
    attempt = int(getattr(request, ATTEMPT_HEADER, None) or 1)
    job = supervisor.ledger.get(job_id)
    if job is not None and job.attempt == attempt:
        # First of all: the copy's end must not look like a lost pool process.
        job.released = job.released or 'cancelled'
        if job.started is None:
            supervisor.ledger.discard(job)

    store = supervisor.store
    reason = store.cancelled(job_id)
    if reason is None:
        reason = 'expired' if expired else 'revoked'
        store.cancel(job_id, reason)
    else:
        # Celery stored REVOKED with a word of its own; keep the given reason.
        # TODO(atomic writes in Celery's file:// result backend): it rewrites a
        # result file in place, so a worker that reads it meanwhile (Celery's
        # revoke handler does) can see PENDING and store REVOKED 'revoked'
        # over this reason; the store's cancel mark keeps the reason.
        sender.backend.mark_as_revoked(job_id, reason)
    store.log(job_id, {'event': 'revoked', 'attempt': attempt,
                       'worker': supervisor.hostname, 'at': time.time(),
                       'reason': reason})
    logger.warning(
        'Job %s attempt %d on %s was %s (%s): it is cancelled for good, and no '
        'takeover will run it again.', job_id, attempt, supervisor.hostname,
        'stopped by a revoke' if terminated else 'revoked', reason,
    )
    task_name = sender.name
    announce_now(supervisor, 'cancelled', job_id, attempt, task_name,
                 worker=supervisor.hostname, reason=reason)
    announce_now(supervisor, 'finished', job_id, attempt, task_name,
                 worker=supervisor.hostname, state=REVOKED)
