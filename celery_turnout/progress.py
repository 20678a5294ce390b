"""Job progress: reported cheaply by the job, learnt once per tick by its owner.

In the pool process, :class:`Reporter` keeps the latest value a job reported
with :meth:`~celery_turnout.TurnoutTask.progress` and writes it at most once per
:data:`WRITE_PERIOD`: to the turnout store, fenced by attempt (a superseded
copy's write is refused and the copy stops), then to the result backend as
state ``PROGRESS``. The last value is written when the job ends or saves a
checkpoint, so the next attempt starts from it.

In the worker's main process, :class:`ProgressWatch` reads the progress of
every held job in one batched store call after each supervise tick. That feeds
``inspect turnout-jobs``, the ``turnout-job-progress`` events and stall
detection, at one store round trip per interval however many jobs are held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import signals
from .canvas import context_of_request, store_failure
from .errors import JobStalled, JobSuperseded
from .events import announce, announce_now, sends_job_events
from .ledger import HeldJob

if TYPE_CHECKING:
    from .supervision import Supervisor

logger = logging.getLogger(__name__)

#: The result backend state of a job that reported progress.
PROGRESS = 'PROGRESS'
#: Seconds between two writes of one job's progress.
WRITE_PERIOD = 1.0
#: Longest note kept with a progress value, in characters.
NOTE_LIMIT = 200
#: What a task's ``on_stall`` option may say.
STALL_ACTIONS = ('report', 'restart', 'fail')

#: A progress value: ``(done, total, note)``.
Value = tuple[Any, Any, Any]


def value_of(record: Mapping[str, Any] | None) -> Value | None:
    """The ``(done, total, note)`` of a progress record, or None."""
    if not record:
        return None
    return (record.get('done', 0), record.get('total'), record.get('note'))


class Reporter:
    """The progress of one running copy of a job, in its pool process.

    Args:
        task: The running task, for its store, backend and request.
        store: The turnout store.
        job_id: The job.
        attempt: The attempt this copy runs as.
        carried: The last progress an earlier attempt saved, if any: the
            starting value of this one.
    """

    def __init__(
        self, task: Any, store: Any, job_id: str, attempt: int,
        carried: Mapping[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.value = value_of(carried)
        self.moved = time.time()
        self.dirty = False
        self._written_at = float('-inf')
        self._store_down = False

    def report(self, done: float, total: float | None, note: str | None) -> None:
        """Take a new value; write it if the last write is old enough.

        Raises:
            JobSuperseded: the store refused the write: a newer attempt took
                the job over, or it finished or was cancelled.
            TypeError: ``done`` or ``total`` is not a number.
        """
        value = (_number(done, 'done'), _optional_number(total, 'total'),
                 None if note is None else str(note)[:NOTE_LIMIT])
        if value != self.value:
            self.value = value
            self.moved = time.time()
        self.dirty = True
        if time.monotonic() - self._written_at >= WRITE_PERIOD:
            self.write()

    def record(self) -> dict[str, Any]:
        """The value as the store keeps it."""
        done, total, note = self.value or (0, None, None)
        return {'done': done, 'total': total, 'note': note, 'attempt': self.attempt,
                'at': time.time(), 'moved': self.moved}

    def meta(self) -> dict[str, Any]:
        """The value as the result backend shows it (``AsyncResult.info``)."""
        done, total, note = self.value or (0, None, None)
        return {'done': done, 'total': total, 'note': note, 'attempt': self.attempt}

    def write(self) -> None:
        """Write the value now, to the store and then the result backend.

        Raises:
            JobSuperseded: the store refused the write.
        """
        try:
            saved = self.store.save_progress(self.job_id, self.attempt, self.record())
        except Exception as exc:  # progress is not worth failing a job for
            self._store_failed(exc)
            return
        if not saved:
            raise JobSuperseded(
                f'job {self.job_id} attempt {self.attempt} was taken over, '
                'finished or cancelled; its progress is refused'
            )
        self.written()

    def written(self, backend: bool = True) -> None:
        """Note that the store holds the value; show it in the result backend.

        Args:
            backend: Also write state ``PROGRESS`` to the result backend.
        """
        self.dirty = False
        self._written_at = time.monotonic()
        self._store_down = False
        task, done = self.task, self.value or (0, None, None)
        # TODO(a compare-and-set on the result backend): the store refuses a
        # superseded attempt atomically, but the backend write follows it, so a
        # takeover in between can still be overwritten once; the newer
        # attempt's next write puts it right.
        if backend and not task.request.ignore_result:
            task.update_state(state=PROGRESS, meta=self.meta())
        signals.job_progress.send(
            sender=task, job_id=self.job_id, attempt=self.attempt,
            done=done[0], total=done[1], note=done[2],
        )

    def flush(self) -> None:
        """Write an unwritten value to the store only, as the job ends.

        The result backend is about to get the job's outcome, and a refusal
        changes nothing any more: a superseded copy's outcome is dropped anyway.
        """
        if not self.dirty:
            return
        try:
            if self.store.save_progress(self.job_id, self.attempt, self.record()):
                self.dirty = False
        except Exception as exc:
            self._store_failed(exc)

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_down:
            logger.warning(
                'Could not save the progress of job %s attempt %d on %s: the '
                'turnout store is unreachable (%r); the job goes on and tries '
                'again in %.0f s.', self.job_id, self.attempt,
                self.task.request.hostname, exc, WRITE_PERIOD,
            )
        self._store_down = True
        self._written_at = time.monotonic()


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'progress {name} must be a number, not {value!r:.40}')
    return value


def _optional_number(value: Any, name: str) -> float | None:
    return None if value is None else _number(value, name)


Redispatch = Callable[[Any, str, int, str, str], None]


class ProgressWatch:
    """Learns the progress of held jobs and reports stalls (supervision thread).

    Args:
        supervisor: The worker's supervisor.
        redispatch: Re-dispatches a job as its next attempt on the supervision
            thread's broker session: ``(session, job_id, attempt, event, reason)``.
    """

    def __init__(self, supervisor: Supervisor, redispatch: Redispatch) -> None:
        self.supervisor = supervisor
        self.redispatch = redispatch
        self._store_down = False

    def poll(self, session: Any) -> None:
        """Read the progress of the watched jobs at once, then look for stalls.

        Only jobs with a ``stall_timeout``, or every job when the worker sends
        events, are watched on each tick: otherwise a tick's cost would grow
        with the number of jobs held. ``inspect turnout-jobs`` reads the others
        when it is asked (:meth:`refresh`).
        """
        supervisor = self.supervisor
        jobs = [job for job in supervisor.ledger.held() if self._watched(job)]
        if not jobs:
            return
        try:
            records = supervisor.store.progress_of([job.id for job in jobs])
        except Exception as exc:
            if not self._store_down:
                logger.warning(
                    'Worker %s cannot read the progress of its job(s) %s: the '
                    'turnout store is unreachable (%r). Supervision goes on, and '
                    'stalls are not checked until the store answers.',
                    supervisor.hostname,
                    ', '.join(f'{job.id} attempt {job.attempt}' for job in jobs), exc,
                )
            self._store_down = True
            return
        self._store_down = False
        now = time.time()
        for job, record in zip(jobs, records, strict=True):
            self._learn(job, record)
            try:
                self._check_stall(session, job, now)
            except Exception:
                logger.exception(
                    'Worker %s could not act on the stall of job %s attempt %d; '
                    'it tries again at its next tick.',
                    supervisor.hostname, job.id, job.attempt,
                )
                job.stall_reported = None

    def refresh(self) -> None:
        """Read the progress of every held job now, without sending events."""
        jobs = self.supervisor.ledger.held()
        if not jobs:
            return
        records = self.supervisor.store.progress_of([job.id for job in jobs])
        for job, record in zip(jobs, records, strict=True):
            if record is not None and int(record.get('attempt') or 0) <= job.attempt:
                job.progress = record

    def _watched(self, job: HeldJob) -> bool:
        if sends_job_events(self.supervisor.event_dispatcher):
            return True
        task = self.supervisor.app.tasks.get(job.task)
        return bool(getattr(task, 'stall_timeout', None))

    def _learn(self, job: HeldJob, record: dict[str, Any] | None) -> None:
        if record is None or int(record.get('attempt') or 0) > job.attempt:
            return
        old, job.progress = job.progress, record
        if record.get('attempt') != job.attempt or value_of(old) == value_of(record):
            return
        done, total, note = value_of(record) or (0, None, None)
        announce(self.supervisor, 'progress', job.id, job.attempt, job.task,
                 worker=self.supervisor.hostname, done=done, total=total, note=note)

    def _check_stall(self, session: Any, job: HeldJob, now: float) -> None:
        supervisor = self.supervisor
        task = supervisor.app.tasks.get(job.task)
        timeout = getattr(task, 'stall_timeout', None)
        if not timeout or job.started is None:
            return
        since = stalled_since(job)
        seconds = now - since
        if seconds < timeout or job.stall_reported == since:
            return
        job.stall_reported = since
        action = getattr(task, 'on_stall', 'report')
        logger.warning(
            'Job %s attempt %d on worker %s has made no progress for %.0f s '
            '(stall_timeout %g s); %s.', job.id, job.attempt, supervisor.hostname,
            seconds, timeout, _STALL_WORDS.get(action, _STALL_WORDS['report']),
        )
        announce(supervisor, 'stalled', job.id, job.attempt, job.task,
                 worker=supervisor.hostname, seconds=round(seconds, 1), action=action)
        detail = {'seconds': round(seconds, 1), 'action': action}
        reason = (
            f'its progress did not move for {seconds:.0f} s on {supervisor.hostname} '
            f'(stall_timeout {timeout:g} s)'
        )
        if action == 'restart':
            supervisor.release(job, 'stalled', **detail)
            self.redispatch(session, job.id, job.attempt, 'restarted', reason)
        elif action == 'fail':
            self._fail(job, reason, detail)
        else:
            supervisor.store.log(job.id, _event(supervisor, 'stalled', job, **detail))

    def _fail(self, job: HeldJob, reason: str, detail: dict[str, Any]) -> None:
        supervisor = self.supervisor
        # The completion mark first: from then on no copy starts, and this
        # copy's own outcome, should it still come, is dropped.
        if not supervisor.store.finish(job.id, job.attempt,
                                       f'{supervisor.hostname}:stalled'):
            return
        supervisor.release(job, 'stalled', **detail)
        exc = JobStalled(f'job {job.id} ({job.task}) attempt {job.attempt}: {reason}')

        def fail_now() -> None:
            task = supervisor.app.tasks.get(job.task)
            backend = task.backend if task is not None else supervisor.app.backend
            stored = store_failure(backend, job.id, job.attempt, exc,
                                   lambda: context_of_request(job.request))
            if stored is None:
                supervisor.store.log(job.id, _event(supervisor, 'failed', job,
                                                    reason=str(exc)))
            else:
                # The copy stored its outcome just before it was stopped.
                supervisor.store.log(job.id, _event(
                    supervisor, 'finished', job, state=stored,
                    reason='its outcome was stored before the stall stopped it'))
            announce_now(supervisor, 'finished', job.id, job.attempt, job.task,
                         worker=supervisor.hostname, state=stored or 'FAILURE')

        supervisor.call_soon(fail_now)


_STALL_WORDS = {
    'report': 'it keeps running (on_stall is report)',
    'restart': 'it is stopped and runs again as its next attempt',
    'fail': 'it is stopped and fails with JobStalled',
}


def _event(
    supervisor: Supervisor, name: str, job: HeldJob, **detail: Any,
) -> dict[str, Any]:
    return {'event': name, 'attempt': job.attempt, 'worker': supervisor.hostname,
            'at': time.time(), **detail}


def stalled_since(job: HeldJob) -> float:
    """When the job's progress last moved, or when this attempt started."""
    since = job.started or job.received
    progress = job.progress
    if progress and progress.get('attempt') == job.attempt:
        since = max(since, float(progress.get('moved') or 0))
    return since
