"""Failing a job the way Celery does, so that the canvas around it goes on.

Celery's result backend calls a failed job's errbacks (``link_error``), counts
it as a failed member of its chord and fails the later steps of its chain only
when ``mark_as_failure`` is given the job's request context. Turnout fails some
jobs itself, in the worker's main process and without a running task: a job
that exhausted its attempts, and a stalled job whose ``on_stall`` is ``fail``.
It rebuilds that context from the job's message here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.app.task import Context
from celery.states import READY_STATES
from celery.worker.request import Request
from kombu.message import Message

logger = logging.getLogger(__name__)


def context_of_message(
    message: Message, app: Any, task: Any, hostname: str,
) -> Context:
    """The request context of the job that ``message`` carries.

    Args:
        message: The job's message, its body already checked to be readable.
        app: The Celery app.
        task: The job's task.
        hostname: The worker's node name.

    Raises:
        Exception: Celery could not build a request from the message.
    """
    return context_of_request(Request(message, app=app, task=task, hostname=hostname))


def context_of_request(request: Request) -> Context:
    """The request context of a job whose Celery request the worker built.

    The request's fields come from the message headers; the embedded
    callbacks, errbacks, chain and chord come from the message body.

    Raises:
        Exception: The message body could not be read.
    """
    fields = dict(request.request_dict)
    payload = request.message.payload
    if isinstance(payload, (list, tuple)) and len(payload) == 3:
        embed = payload[2]
        if isinstance(embed, dict):
            fields.update(embed)
    return Context(fields)


def store_failure(
    backend: Any, job_id: str, attempt: int, exc: BaseException,
    context: Callable[[], Context],
) -> str | None:
    """Store FAILURE for a job once, and tell its errbacks, chord and chain.

    Args:
        backend: The job's result backend.
        job_id: The job.
        attempt: The attempt that is failed, for the log.
        exc: The exception stored as the job's result.
        context: Builds the job's request context. Should it fail, or should
            the backend fail on the context, FAILURE is stored without it:
            the job's canvas is then not told, but the worker goes on.

    Returns:
        None once FAILURE is stored (or could not be, which is logged), or the
        state the backend already holds when a copy of the job stored its
        outcome first: that outcome stands, and its canvas was told then.
    """
    try:
        state = backend.get_task_meta(job_id).get('status')
    except Exception as read_exc:  # no result backend, or it is down
        logger.warning(
            'Job %s attempt %d: could not read its stored outcome (%r); storing '
            'its FAILURE all the same.', job_id, attempt, read_exc,
        )
        state = None
    if state in READY_STATES:
        logger.warning(
            'Job %s attempt %d already has its outcome %s in the result backend; '
            'it stands, and %s is not stored over it.',
            job_id, attempt, state, type(exc).__name__,
        )
        return str(state)
    # TODO(run the failure on a thread of its own): Celery calls errbacks that
    # take (request, exc, traceback) in this process, here the worker's main
    # thread, where a slow one holds up the worker.
    try:
        request = context()
    except Exception as build_exc:
        logger.warning(
            'Job %s attempt %d: could not rebuild its Celery request (%r); its '
            'FAILURE is stored without it, so its errbacks, chord and chain are '
            'not told.', job_id, attempt, build_exc,
        )
        _store_plain_failure(backend, job_id, attempt, exc)
        return None
    try:
        backend.mark_as_failure(job_id, exc, request=request)
    except Exception:
        logger.exception(
            'Job %s attempt %d: storing its FAILURE with its Celery request '
            'failed; it is stored once more without it, and its errbacks, chord '
            'and chain may not have been told.', job_id, attempt,
        )
        _store_plain_failure(backend, job_id, attempt, exc)
    return None


def _store_plain_failure(
    backend: Any, job_id: str, attempt: int, exc: BaseException,
) -> None:
    try:
        backend.mark_as_failure(job_id, exc)
    except Exception:
        logger.exception(
            'Job %s attempt %d failed for good, but its FAILURE could not be '
            'stored in the result backend, which shows its last state instead; '
            'turnout\'s history records the failure.', job_id, attempt,
        )
