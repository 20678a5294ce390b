"""The jobs a worker holds, shared by its main thread and its supervision thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HeldJob:
    """One attempt of a job that this worker admitted and has not let go.

    Attributes:
        id: The job id (the Celery task id, the same on every attempt).
        task: The task name.
        attempt: The attempt number, 1 for the first run.
        copy: The id of the message copy this attempt came from.
        received: When this worker admitted it (epoch seconds).
        request: Celery's request, once the worker built it.
        started: When a pool process began running it (epoch seconds).
        covered: True once a supervise tick named it, so that its initiating
            message could be acknowledged.
        seen: True once Celery listed its request as reserved, scheduled or
            active; a seen job that left those lists has finished.
        released: Why this worker gave the job up (``'fenced'``,
            ``'handed_off'``, ``'requeued'``, ``'cancelled'``, ``'stalled'``),
            or None while it is held.
        progress: The latest progress record the store holds for the job, as
            the supervision thread last read it (an earlier attempt's until
            this one reports).
        stall_reported: When the progress last moved before the stall that
            was last reported, so that each stall is reported once.
        child_lost: True once its pool process died; the job stays held
            until its re-dispatch as the next attempt is out.
    """

    id: str
    task: str
    attempt: int
    copy: str
    received: float = field(default_factory=time.time)
    request: Any = None
    started: float | None = None
    covered: bool = False
    seen: bool = False
    released: str | None = None
    progress: dict[str, Any] | None = None
    stall_reported: float | None = None
    child_lost: bool = False

    def describe(self, owner: str, proven: float | None) -> dict[str, Any]:
        """The job as ``inspect turnout-jobs`` reports it."""
        return {
            'id': self.id, 'task': self.task, 'attempt': self.attempt,
            'owner': owner, 'started': self.started or self.received,
            'proven': proven if self.covered else None,
            'state': 'running' if self.started else 'queued',
            'progress': _public(self.progress),
        }


def _public(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    if not progress:
        return None
    keys = ('done', 'total', 'note', 'attempt', 'at', 'moved')
    return {key: progress.get(key) for key in keys}


class Ledger:
    """A thread-safe table of :class:`HeldJob`, keyed by job id."""

    def __init__(self) -> None:
        self._jobs: dict[str, HeldJob] = {}
        self._lock = threading.Lock()

    def add(self, job: HeldJob) -> None:
        """Hold ``job``, replacing an older attempt of the same id."""
        with self._lock:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> HeldJob | None:
        """The job with this id, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def discard(self, job: HeldJob) -> None:
        """Forget ``job`` if it is still the entry for its id."""
        with self._lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    def held(self) -> list[HeldJob]:
        """Jobs not released, oldest first."""
        with self._lock:
            return [job for job in self._jobs.values() if job.released is None]

    def release_held(self, reason: str) -> list[HeldJob]:
        """Release every held job for ``reason`` at once and return them.

        One step under the lock, so that two threads giving the worker's jobs
        up at the same time (a warm and a cold shutdown) never both take one.
        """
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.released is None]
            for job in jobs:
                job.released = reason
            return jobs

    def all(self) -> list[HeldJob]:
        """Every entry, released or not."""
        with self._lock:
            return list(self._jobs.values())

    def prune(self, is_finished: Callable[[HeldJob], bool]) -> list[HeldJob]:
        """Forget the jobs for which ``is_finished`` is true and return them."""
        with self._lock:
            done = [job for job in self._jobs.values() if is_finished(job)]
            for job in done:
                del self._jobs[job.id]
            return done

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
