"""Supervised long-running Celery tasks that survive dead workers."""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import control as _control  # noqa: F401  (registers inspect turnout-jobs)
from .errors import JobExhausted, JobSuperseded, TurnoutError
from .store import store_for
from .task import TurnoutTask, turnout_task

__all__ = [
    'JobExhausted', 'JobSuperseded', 'TurnoutError', 'TurnoutTask', 'history',
    'turnout_task',
]
__version__ = '0.1.0'


def history(app: Celery, job_id: str) -> list[dict[str, Any]]:
    """The recorded events of a job, oldest first.

    Each event is a dict with ``event`` (``'started'``, ``'covered'``,
    ``'taken_over'``, ``'handed_off'``, ``'child_lost'``, ``'fenced'``,
    ``'finished'`` or ``'failed'``), ``attempt``, ``worker`` and ``at`` (epoch
    seconds), plus details such as ``reason`` or ``by``.
    """
    return store_for(app).history(job_id)
