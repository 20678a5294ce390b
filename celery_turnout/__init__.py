"""Supervised long-running Celery tasks that survive dead workers."""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import control as _control  # noqa: F401  (registers inspect turnout-jobs)
from .cancellation import cancel
from .errors import JobExhausted, JobStalled, JobSuperseded, TurnoutError
from .store import store_for
from .task import TurnoutTask, turnout_task

__all__ = [
    'JobExhausted', 'JobStalled', 'JobSuperseded', 'TurnoutError', 'TurnoutTask',
    'cancel', 'cancelled', 'checkpoint_of', 'history', 'progress_of',
    'turnout_task',
]
__version__ = '0.1.0'


def history(app: Celery, job_id: str) -> list[dict[str, Any]]:
    """The recorded events of a job, oldest first.

    Each event is a dict with ``event`` (``'started'``, ``'covered'``,
    ``'taken_over'``, ``'handed_off'``, ``'child_lost'``, ``'fenced'``,
    ``'finished'``, ``'failed'``, ``'stalled'``, ``'restarted'``,
    ``'cancelled'``, ``'revoked'`` or ``'refused'``), ``attempt``, ``worker``
    and ``at`` (epoch seconds), plus details such as ``reason`` or ``by``.
    """
    return store_for(app).history(job_id)


def progress_of(app: Celery, job_id: str) -> dict[str, Any] | None:
    """The latest progress a job saved, or None.

    A dict with ``done``, ``total``, ``note``, ``attempt`` (the attempt that
    reported it), ``at`` (when it was written) and ``moved`` (when it last
    changed), as epoch seconds.
    """
    return store_for(app).progress(job_id)


def checkpoint_of(app: Celery, job_id: str) -> dict[str, Any] | None:
    """The last checkpoint a job saved, or None.

    A dict with ``state`` (what the job passed to ``self.checkpoint``),
    ``attempt`` and ``at`` (epoch seconds).
    """
    return store_for(app).checkpoint(job_id)


def cancelled(app: Celery, job_id: str) -> str | None:
    """Why the job was cancelled (by :func:`cancel` or a revoke), or None."""
    return store_for(app).cancelled(job_id)
