"""The task class of supervised jobs, and the decorator that makes one."""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery, Task, bootsteps
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_process_init
from celery.states import STARTED

from . import signals
from .errors import ImproperlyConfigured, JobSuperseded
from .faults import fault_point
from .messages import ATTEMPT_HEADER, COPY_HEADER
from .progress import STALL_ACTIONS, Reporter
from .settings import MIN_SUPERVISE_INTERVAL
from .store import store_for

logger = logging.getLogger(__name__)

#: Largest checkpoint, in bytes of JSON: a checkpoint says where to resume,
#: it does not carry the work itself.
MAX_CHECKPOINT_BYTES = 64 * 1024


class TurnoutTask(Task):
    """A Celery task whose runs are supervised, long-running jobs.

    The worker acknowledges a job's message within about one supervise
    interval and from then on protects the job by supervision: if the worker
    dies, another worker runs the job again under the same id as its next
    attempt. Use it as ``@app.task(base=TurnoutTask)`` or through
    :func:`turnout_task`.

    Inside a job, :attr:`attempt` is the attempt number; code with side
    effects outside Celery can use ``(self.request.id, self.attempt)`` as a
    fencing token, and long loops can call :meth:`raise_if_superseded`.
    :meth:`progress` reports how far the job got, :meth:`checkpoint` saves
    where a later attempt should resume, and :attr:`resume_state` gives it
    back.
    """

    Request = 'celery_turnout.intake:TurnoutRequest'
    Strategy = 'celery_turnout.intake:supervised'

    # The job's message stays unacknowledged until the first supervise tick
    # covers the job; turnout acknowledges it then. A lost pool process is
    # handled by turnout, not by Celery's requeue.
    acks_late = True
    acks_on_failure_or_timeout = True
    reject_on_worker_lost = False

    #: Takeovers allowed before the job fails; None uses turnout_max_takeovers.
    max_takeovers: int | None = None
    #: The longest supervise interval this task accepts, in seconds; the worker
    #: supervises at the shortest interval any of its turnout tasks asks for.
    #: None uses turnout_supervise_interval.
    supervise_interval: float | None = None
    #: Seconds the job's progress may stand still before the job counts as
    #: stalled; None never does. Measured from the attempt's start until the
    #: first :meth:`progress` call.
    stall_timeout: float | None = None
    #: What a stall does besides a warning and a ``turnout-job-stalled`` event:
    #: ``'report'`` nothing more, ``'restart'`` stops the copy and runs the job
    #: again as its next attempt, ``'fail'`` stops it and ends the job
    #: ``FAILURE`` with :class:`~celery_turnout.errors.JobStalled`.
    on_stall: str = 'report'

    @classmethod
    def on_bound(cls, app: Celery) -> None:
        """Check the turnout options and install the supervision bootstep.

        Raises:
            ImproperlyConfigured: ``stall_timeout``, ``supervise_interval``,
                ``max_takeovers`` or ``on_stall`` is invalid.
        """
        super().on_bound(app)
        for option in ('stall_timeout', 'supervise_interval'):
            value = getattr(cls, option)
            if value is not None and not _positive_number(value):
                raise ImproperlyConfigured(
                    f'task {cls.name}: {option} is {value!r}; use a positive '
                    'number of seconds or None.'
                )
        interval = cls.supervise_interval
        if interval is not None and interval < MIN_SUPERVISE_INTERVAL:
            raise ImproperlyConfigured(
                f'task {cls.name}: supervise_interval is {interval:g} s; use at '
                f'least {MIN_SUPERVISE_INTERVAL:g} s, the shortest interval '
                'turnout_supervise_interval accepts.'
            )
        takeovers = cls.max_takeovers
        if takeovers is not None and (
            isinstance(takeovers, bool) or not isinstance(takeovers, int)
            or takeovers < 0
        ):
            raise ImproperlyConfigured(
                f'task {cls.name}: max_takeovers is {takeovers!r}; use an integer '
                '>= 0 or None.'
            )
        if cls.on_stall not in STALL_ACTIONS:
            raise ImproperlyConfigured(
                f'task {cls.name}: on_stall is {cls.on_stall!r}; use one of '
                f'{STALL_ACTIONS}.'
            )
        install(app)

    @property
    def attempt(self) -> int:
        """The attempt of the running job: 1 on its first run."""
        return int(getattr(self.request, ATTEMPT_HEADER, None) or 1)

    @property
    def superseded(self) -> bool:
        """True when a newer attempt took this job over, or it was cancelled."""
        if getattr(self.request, ATTEMPT_HEADER, None) is None:
            return False
        return store_for(self.app).superseded(self.request.id, self.attempt)

    def raise_if_superseded(self) -> None:
        """Stop this copy if another worker took the job over.

        Raises:
            JobSuperseded: this attempt was taken over or cancelled; the
                exception ends the copy and its result is not stored.
        """
        if self.superseded:
            raise JobSuperseded(
                f'job {self.request.id} attempt {self.attempt} was taken over '
                'or cancelled'
            )

    def progress(
        self, done: float, total: float | None = None, note: str | None = None,
    ) -> None:
        """Report how far the job got; cheap enough for a hot loop.

        The value is written at most about once a second (and always when the
        job ends or saves a checkpoint): to the turnout store, where ``celery
        inspect turnout-jobs`` and the next attempt find it, and to the result
        backend as state ``PROGRESS`` with meta ``{done, total, note,
        attempt}``, which ``AsyncResult(job_id).info`` returns. Outside a
        worker it does nothing.

        Args:
            done: Units of work done so far.
            total: Units of work in all, if known.
            note: A short word on what the job is doing.

        Raises:
            JobSuperseded: another attempt took the job over, or it was
                cancelled: this copy must stop.
        """
        reporter = self._reporter()
        if reporter is not None:
            reporter.report(done, total, note)

    def checkpoint(self, state: Any) -> None:
        """Save where a later attempt should resume, durably, in the turnout store.

        The next attempt of the job, after a takeover, finds ``state`` in
        :attr:`resume_state`. The latest progress is saved with it.

        Args:
            state: A small JSON-serialisable value (at most
                :data:`MAX_CHECKPOINT_BYTES` as JSON).

        Raises:
            JobSuperseded: another attempt took the job over, or it was
                cancelled: the checkpoint is refused and this copy must stop.
            TypeError: ``state`` is not JSON-serialisable.
            ValueError: ``state`` is too large.
        """
        try:
            size = len(json.dumps(state))
        except (TypeError, ValueError) as exc:
            raise TypeError(f'a checkpoint must be JSON-serialisable: {exc}') from exc
        if size > MAX_CHECKPOINT_BYTES:
            raise ValueError(
                f'a checkpoint of {size} bytes is larger than the '
                f'{MAX_CHECKPOINT_BYTES} bytes allowed; save where to resume, '
                'not the work itself'
            )
        reporter = self._reporter()
        if reporter is None:
            return
        job_id, attempt = self.request.id, reporter.attempt
        progress = reporter.record() if reporter.value is not None else None
        if not reporter.store.save_checkpoint(job_id, attempt, state, progress):
            raise JobSuperseded(
                f'job {job_id} attempt {attempt} was taken over, finished or '
                'cancelled; its checkpoint is refused'
            )
        logger.debug(
            'Job %s attempt %d saved a checkpoint on %s.',
            job_id, attempt, self.request.hostname,
        )
        if progress is not None:
            reporter.written()
        signals.job_checkpointed.send(
            sender=self, job_id=job_id, attempt=attempt, state=state,
        )

    @property
    def resume_state(self) -> Any:
        """The last checkpoint an earlier attempt saved; None on the first attempt.

        Read once as the attempt starts: the attempt's own checkpoints are for
        the attempt after it.
        """
        return getattr(self.request, 'turnout_resume_state', None)

    def _reporter(self) -> Reporter | None:
        reporter: Reporter | None = getattr(self.request, 'turnout_progress', None)
        return reporter

    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
        producer: Any = None, link: Any = None, link_error: Any = None,
        shadow: str | None = None, **options: Any,
    ) -> Any:
        """Send the job, marking the message as a fresh copy of its attempt."""
        headers = dict(options.pop('headers', None) or {})
        request = self.request
        retrying = (
            task_id is not None and not request.called_directly
            and request.id == task_id
        )
        # Task.retry() sends the running job again under its own id: that send
        # is the job's next attempt, not a duplicate of this one.
        headers[ATTEMPT_HEADER] = self.attempt + 1 if retrying else 1
        headers[COPY_HEADER] = uuid.uuid4().hex
        return super().apply_async(
            args, kwargs, task_id, producer, link, link_error, shadow,
            headers=headers, **options,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attempt = getattr(self.request, ATTEMPT_HEADER, None)
        if attempt is None or self.request.called_directly:
            return super().__call__(*args, **kwargs)
        job_id, worker = self.request.id, self.request.hostname
        store = store_for(self.app)
        # The main process stops a copy released before it started when a pool
        # process accepts it, but only after the task has begun; this check
        # keeps the user's code from running at all in the meantime.
        try:
            superseded = store.superseded(job_id, attempt)
        except Exception as exc:
            logger.warning(
                'Could not read whether job %s attempt %d was taken over (%r); '
                'running it on %s, where the worker stops it if it was.',
                job_id, attempt, exc, worker,
            )
            superseded = False
        if superseded:
            logger.warning(
                'Not running job %s attempt %d on %s: it was taken over, finished '
                'or cancelled before a pool process got to it.',
                job_id, attempt, worker,
            )
            raise Ignore()

        reporter = self._resume(store, job_id, attempt, worker)
        # Like Celery, a first attempt is STARTED only when the task tracks it;
        # a later one always says so, so that no earlier attempt's state stays.
        if not self.request.ignore_result and (attempt > 1 or self.track_started):
            self.update_state(state=STARTED, meta={
                'attempt': attempt, 'worker': worker, 'pid': os.getpid(),
                **(reporter.meta() if reporter.value is not None else {}),
            })
        try:
            result = super().__call__(*args, **kwargs)
        except (Retry, Ignore, Reject):
            reporter.flush()
            raise
        except BaseException:
            reporter.flush()
            self._drop_if_superseded(store, job_id, attempt, worker)
            raise
        reporter.flush()
        self._drop_if_superseded(store, job_id, attempt, worker)
        return result

    def _resume(self, store: Any, job_id: str, attempt: int, worker: str) -> Reporter:
        # What an earlier attempt left: its last progress and checkpoint.
        progress = checkpoint = None
        if attempt > 1:
            progress, checkpoint = store.progress(job_id), store.checkpoint(job_id)
        if progress is not None and int(progress.get('attempt') or 0) >= attempt:
            progress = None
        if checkpoint is not None and int(checkpoint.get('attempt') or 0) < attempt:
            self.request.turnout_resume_state = checkpoint.get('state')
            logger.info(
                'Job %s attempt %d on %s resumes from the checkpoint attempt %d '
                'saved %.0f s ago.', job_id, attempt, worker, checkpoint['attempt'],
                time.time() - float(checkpoint.get('at') or 0),
            )
        else:
            self.request.turnout_resume_state = None
        reporter = Reporter(self, store, job_id, attempt, progress)
        self.request.turnout_progress = reporter
        return reporter

    def _drop_if_superseded(
        self, store: Any, job_id: str, attempt: int, worker: str,
    ) -> None:
        if not store.superseded(job_id, attempt):
            return
        logger.warning(
            'Job %s attempt %d ended on %s after a newer attempt took it over or '
            'it was cancelled; this copy\'s outcome is dropped so that it cannot '
            'overwrite the newer one.', job_id, attempt, worker,
        )
        raise Ignore()

    def after_return(
        self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
        einfo: Any,
    ) -> None:
        """Mark a supervised job finished, once Celery has stored its outcome.

        Claiming completion only after the outcome is stored means a worker that
        dies in between leaves a job that looks unfinished: it may run once more
        (admission drops it when the backend already holds its outcome), but its
        result is never lost.
        """
        super().after_return(status, retval, task_id, args, kwargs, einfo)
        attempt = getattr(self.request, ATTEMPT_HEADER, None)
        if attempt is None or self.request.called_directly:
            return
        worker = self.request.hostname
        store = store_for(self.app)
        fault_point('finish.before_claim')
        finished = {'event': 'finished', 'attempt': attempt, 'worker': worker,
                    'at': time.time(), 'state': status}
        if store.finish(task_id, attempt, worker, finished):
            logger.info(
                'Job %s attempt %d finished on %s (%s).',
                task_id, attempt, worker, status,
            )
        else:
            logger.warning(
                'Job %s attempt %d stored its outcome on %s just as a newer '
                'attempt took it over; the newer attempt\'s outcome will replace '
                'it.', task_id, attempt, worker,
            )


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0
    )


def turnout_task(app: Celery, *args: Any, **options: Any) -> Callable[..., Any]:
    """Declare a supervised job, like ``@app.task`` with base :class:`TurnoutTask`.

    Takes every option ``app.task`` takes, plus ``max_takeovers`` and
    ``supervise_interval``::

        @turnout_task(app, bind=True, max_takeovers=2)
        def rebuild_index(self, shard):
            ...
    """
    options.setdefault('base', TurnoutTask)
    install(app)
    return app.task(*args, **options)  # type: ignore[no-any-return]


def install(app: Celery) -> None:
    """Add turnout's bootstep to ``app``'s worker consumer (once)."""
    from .bootstep import Supervision

    steps: set[type[bootsteps.Step]] = app.steps['consumer']
    if Supervision not in steps:
        steps.add(Supervision)


@worker_process_init.connect(weak=False)
def _die_with_the_worker(**_: Any) -> None:
    # A pool process whose main process was killed (OOM killer, SIGKILL) would
    # otherwise run its job on as an orphan that no one can fence.
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)
