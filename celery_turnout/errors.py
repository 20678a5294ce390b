"""Exceptions raised by celery-turnout.

These live in their own module so that a client process can unpickle or
re-create them from a result backend without importing the worker side.
"""

from __future__ import annotations


class TurnoutError(Exception):
    """Base class for every error celery-turnout raises."""


class ImproperlyConfigured(TurnoutError):
    """A ``turnout_*`` setting or the worker set-up cannot work."""


class MalformedMessage(TurnoutError):
    """A message on a turnout queue does not have the expected shape."""


class JobExhausted(TurnoutError):
    """A job lost its worker on every attempt it was allowed.

    Stored as the job's ``FAILURE`` result, so ``AsyncResult.get()`` raises it
    in the client.
    """


class JobSuperseded(TurnoutError):
    """This copy of a job was taken over or cancelled and must stop.

    Raised inside a job by :meth:`~celery_turnout.TurnoutTask.raise_if_superseded`
    so that a copy running on a worker that was presumed dead stops early.
    """


class JobStalled(TurnoutError):
    """A job's progress did not move for its ``stall_timeout``.

    Stored as the job's ``FAILURE`` result when the task's ``on_stall`` option
    is ``'fail'``; the message names the job, the attempt, the worker and how
    long the progress stood still.
    """
