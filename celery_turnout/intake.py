"""Admission of turnout jobs in the worker's main process.

Every job message passes through :func:`supervised`, the task strategy of
:class:`~celery_turnout.TurnoutTask`, before Celery builds a request for it.
The claim store decides whether this copy starts and as which attempt; a copy
that must not start is acknowledged and dropped here, so that it never reaches
the pool. An admitted job enters the worker's ledger, and its request
(:class:`TurnoutRequest`) reports back when a pool process accepts it, and how
it ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery import Celery
from celery.canvas import Signature
from celery.exceptions import Ignore, InvalidTaskError, Reject, Retry
from celery.states import FAILURE, READY_STATES, SUCCESS
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message

from .canvas import context_of_message, store_failure
from .errors import JobExhausted, MalformedMessage
from .events import announce_now
from .faults import fault_point
from .ledger import HeldJob
from .messages import ATTEMPT_HEADER, StoredMessage, attempt_of, copy_id
from .store import Verdict
from .supervision import REASON_HEADER, Supervisor, supervisor_of

logger = logging.getLogger(__name__)

#: Seconds before a message is returned to the broker when the store is down.
STORE_RETRY_DELAY = 2.0


def supervised(
    task: Any, app: Celery, consumer: Any, **kwargs: Any,
) -> Callable[..., Any]:
    """The task strategy of turnout tasks: admit each job, then hand it to Celery."""
    handle = default_strategy(task, app, consumer, **kwargs)

    def handle_job(
        message: Message, body: Any, ack: Any, reject: Any, callbacks: Any,
        **options: Any,
    ) -> Any:
        supervisor = supervisor_of(app)
        if supervisor is None:
            logger.error(
                'Turnout job %s of task %s arrived before turnout supervision '
                'started on this worker; it runs unsupervised.',
                (message.headers or {}).get('id'), task.name,
            )
            return handle(message, body, ack, reject, callbacks, **options)

        # A body Celery cannot decode must fail here, as it would without
        # turnout, before the job is claimed and held.
        payload = message.payload
        problem = _body_problem(payload)
        if problem is not None:
            _refuse_body(supervisor, app, task, message, problem)
            return None
        job = admit(supervisor, task, message, consumer.timer)
        if job is None:
            return None
        try:
            result = handle(message, body, ack, reject, callbacks, **options)
        except (InvalidTaskError, ContentDisallowed, DecodeError) as exc:
            # Celery rejects the message for good; without a record the job
            # would stay PENDING and be supervised and taken over forever.
            supervisor.ledger.discard(job)
            logger.error(
                'Job %s attempt %d is dropped: Celery refused its message (%s). '
                'It is marked FAILURE and never runs.', job.id, job.attempt, exc,
            )
            supervisor.store.log(job.id, supervisor.event(
                'refused', job.attempt, reason=str(exc)))
            try:
                app.backend.mark_as_failure(job.id, exc)
            except Exception as store_exc:  # no result backend, or it is down
                logger.warning(
                    'Could not store FAILURE for job %s (%r).', job.id, store_exc,
                )
            raise
        except BaseException:
            supervisor.ledger.discard(job)
            raise
        request = job.request
        if request is not None and (
            request in worker_state.reserved_requests
            or request in worker_state.scheduled_requests
            or request in worker_state.active_requests
        ):
            job.seen = True
        elif job.started is None and (
            message.acknowledged or consumer.task_buckets.get(task.name) is None
        ):
            # Celery let go of it at once (revoked or expired on arrival, or
            # an ETA it could not read, rejected a moment later); only a job
            # of a rate-limited task may wait in its token bucket.
            supervisor.ledger.discard(job)
            logger.info(
                'Job %s attempt %d was refused by Celery on arrival (revoked, '
                'expired or unreadable); this worker holds it no longer.',
                job.id, job.attempt,
            )
        return result

    return handle_job


def _body_problem(payload: Any) -> str | None:
    """What is wrong with a task message body of Celery's protocol 2, or None.

    Celery unpacks the body while it builds the request, and a body of the
    wrong shape raises there and stops the whole worker.
    """
    if isinstance(payload, dict) and 'args' in payload:
        return None  # protocol 1, refused by admit() for want of an id header
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return 'its body is not the [args, kwargs, embed] list of a task message'
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        return f'its args are a {type(args).__name__}, not a list'
    if not isinstance(kwargs, dict):
        return f'its kwargs are a {type(kwargs).__name__}, not a mapping'
    if embed is None:
        return None
    if not isinstance(embed, dict):
        return f'its embedded options are a {type(embed).__name__}, not a mapping'
    # Celery reads these only after the job ran, and a malformed one makes it
    # fail there, past the point where turnout records how the job ended.
    for key in ('callbacks', 'errbacks', 'chain'):
        signatures = embed.get(key)
        if signatures is None:
            continue
        if not isinstance(signatures, (list, tuple)):
            return (f'its embedded {key} are a {type(signatures).__name__}, '
                    f'not a list of signatures')
        for signature in signatures:
            # Celery builds a signature from a bare task name too.
            if isinstance(signature, str):
                continue
            why = _signature_problem(signature)
            if why is not None:
                return (f'its embedded {key} hold {signature!r:.60}, which is '
                        f'not a task signature ({why})')
    chord = embed.get('chord')
    why = None if chord is None else _signature_problem(chord)
    if why is not None:
        return f'its embedded chord is {chord!r:.60}, not a task signature ({why})'
    return None


#: The canvas types of Celery 5, should its registry be empty.
KNOWN_SIGNATURE_TYPES = frozenset(
    {'chain', 'chord', 'chunks', 'group', 'xmap', 'xstarmap'},
)


def _signature_problem(value: Any) -> str | None:
    """Why ``value`` is not the outer shape of a task signature, or None.

    Nested canvases (chain, group, chord) carry their parts in ``kwargs``;
    only their outer shape is checked.
    """
    if not isinstance(value, dict):
        return f'it is a {type(value).__name__}, not a mapping'
    if not isinstance(value.get('task'), str):
        return 'its task name is not a string'
    if not isinstance(value.get('args'), (list, tuple, type(None))):
        return f'its args are a {type(value["args"]).__name__}, not a list'
    for key in ('kwargs', 'options'):
        if not isinstance(value.get(key), (dict, type(None))):
            return f'its {key} are a {type(value[key]).__name__}, not a mapping'
    kind = value.get('subtask_type')
    if kind is not None and not (isinstance(kind, str) and kind in _signature_types()):
        return f'its subtask_type {kind!r:.30} is no canvas type Celery knows'
    return None


def _signature_types() -> Collection[str]:
    # Read on each use: an app may register a canvas type after import.
    return Signature.TYPES or KNOWN_SIGNATURE_TYPES


def _refuse_body(
    supervisor: Supervisor, app: Celery, task: Any, message: Message, problem: str,
) -> None:
    headers = message.headers or {}
    job_id = headers.get('id')
    logger.error(
        'Dropping a message of job %s (%s): %s. The job is marked FAILURE and '
        'never runs; the worker goes on.', job_id, task.name, problem,
    )
    if isinstance(job_id, str) and job_id:
        try:
            attempt = attempt_of(headers)
        except MalformedMessage:
            attempt = 1
        supervisor.store.log(job_id, supervisor.event('refused', attempt,
                                                      reason=problem))
        try:
            app.backend.mark_as_failure(
                job_id, InvalidTaskError(f'job {job_id} ({task.name}): {problem}'),
            )
        except Exception as exc:  # no result backend, or it is down
            logger.warning('Could not store FAILURE for job %s (%r).', job_id, exc)
    message.ack()


def admit(
    supervisor: Supervisor, task: Any, message: Message, timer: Any,
) -> HeldJob | None:
    """Claim this copy of a job; return the held job, or None if it must not run.

    A copy that must not run is acknowledged here. When the store cannot be
    reached the message is returned to the broker a little later, unacknowledged
    until then, so that no job is lost while the store is down.
    """
    headers = message.headers or {}
    job_id = headers.get('id')
    if not isinstance(job_id, str) or not job_id:
        logger.error(
            'Dropping a message for turnout task %s that has no job id header '
            '(Celery message protocol 1 is not supported).', task.name,
        )
        message.ack()
        return None
    try:
        attempt = attempt_of(headers)
    except MalformedMessage as exc:
        logger.warning('Job %s: %s; treating it as attempt 1.', job_id, exc)
        attempt = 1
    copy = copy_id(headers, job_id, attempt)
    retries = headers.get('retries') or 0
    last_attempt = 1 + _max_takeovers(task, supervisor) + (
        retries if isinstance(retries, int) else 0
    )

    try:
        admission = supervisor.store.admit(
            job_id, attempt, copy, StoredMessage.from_message(message).dumps(),
            last_attempt,
            {'event': 'started', 'worker': supervisor.hostname, 'at': time.time(),
             'copy': copy, 'reason': headers.get(REASON_HEADER)},
        )
    except Exception as exc:
        logger.error(
            'Cannot admit job %s attempt %d: the turnout store is unreachable '
            '(%r). The message goes back to the broker in %.0f s and is retried.',
            job_id, attempt, exc, STORE_RETRY_DELAY,
        )
        timer.call_after(STORE_RETRY_DELAY, _requeue, (message,))
        return None

    verdict = admission.verdict
    if verdict is Verdict.START and admission.attempt > 1:
        verdict = _unless_outcome_stored(supervisor, task, job_id, admission.attempt)
    if verdict is Verdict.START:
        fault_point('admit.after_claim')
        if admission.attempt != attempt:
            logger.warning(
                'Job %s copy %s comes back after its holder died before covering '
                'it; starting it as attempt %d.', job_id, copy, admission.attempt,
            )
        logger.info(
            'Job %s (%s) attempt %d admitted on worker %s.',
            job_id, task.name, admission.attempt, supervisor.hostname,
        )
        older = supervisor.ledger.get(job_id)
        if older is not None and older.released is None:
            _make_way(supervisor, older, headers, admission.attempt)
        job = HeldJob(job_id, task.name, admission.attempt, copy)
        supervisor.ledger.add(job)
        return job

    if verdict is Verdict.EXHAUSTED:
        reason = headers.get(REASON_HEADER) or (
            'the worker holding it died before its first supervise tick and the '
            'broker returned its message'
        )
        _fail_exhausted(supervisor, task, job_id, admission.attempt, reason, message)
    elif verdict is Verdict.DUPLICATE:
        logger.info(
            'Dropping copy %s of job %s: attempt %d is already held by copy %s.',
            copy, job_id, admission.attempt, admission.holder,
        )
    elif verdict is Verdict.FINISHED:
        logger.info(
            'Dropping copy %s of job %s attempt %d: the job already finished (%s).',
            copy, job_id, admission.attempt, admission.holder,
        )
    else:
        logger.info(
            'Dropping copy %s of job %s: the job was cancelled (%s).',
            copy, job_id, admission.holder,
        )
    message.ack()
    return None


def _make_way(
    supervisor: Supervisor, older: HeldJob, headers: dict[str, Any], attempt: int,
) -> None:
    """Let go of this worker's older copy of a job whose next attempt it admitted."""
    if older.child_lost:
        return  # its pool process died; this worker re-dispatched it
    if _retries_of(headers) > _retries_of(older.request):
        # Task.retry() sent it; ending the older copy would kill a pool
        # process that is about to report the retry.
        logger.info(
            'Job %s attempt %d is the retry that attempt %d asked for; the older '
            'copy ends by itself.', older.id, attempt, older.attempt,
        )
        return
    # This worker was presumed dead and now gets the job's next attempt: its
    # own older copy is fenced as on any other worker.
    logger.warning(
        'Job %s attempt %d arrives at worker %s, which still holds attempt %d of '
        'it; stopping the older copy.', older.id, attempt, supervisor.hostname,
        older.attempt,
    )
    supervisor.release(older, 'fenced', by=supervisor.hostname)


def _retries_of(source: Any) -> int:
    """Celery's retry count, from message headers or from a request."""
    if isinstance(source, dict):
        retries = source.get('retries')
    else:
        retries = getattr(source, 'request_dict', {}).get('retries')
    return retries if isinstance(retries, int) and not isinstance(retries, bool) else 0


def _unless_outcome_stored(
    supervisor: Supervisor, task: Any, job_id: str, attempt: int,
) -> Verdict:
    # A worker that died after storing a job's outcome and before claiming its
    # completion leaves a job that looks unfinished; the backend knows better.
    try:
        meta = task.backend.get_task_meta(job_id, cache=False)
    except Exception as exc:
        logger.warning(
            'Could not read the stored outcome of job %s (%r); starting attempt %d '
            'anyway.', job_id, exc, attempt,
        )
        return Verdict.START
    if meta.get('status') not in READY_STATES:
        return Verdict.START
    # The claim already logged this attempt as started; the history says why
    # it ends at once.
    supervisor.store.finish(
        job_id, attempt, f'{supervisor.hostname}:stored',
        supervisor.event(
            'finished', attempt, state=meta['status'],
            reason=f'the result backend already holds its outcome '
                   f'({meta["status"]}); this attempt did not run',
        ),
    )
    return Verdict.FINISHED


def _max_takeovers(task: Any, supervisor: Supervisor) -> int:
    own = getattr(task, 'max_takeovers', None)
    return supervisor.settings.max_takeovers if own is None else int(own)


def _fail_exhausted(
    supervisor: Supervisor, task: Any, job_id: str, attempt: int,
    reason: str, message: Message,
) -> None:
    exc = JobExhausted(
        f'job {job_id} ({task.name}) was lost on each of its {attempt - 1} '
        f'attempts, the last time because {reason}; giving up after '
        f'{_max_takeovers(task, supervisor)} takeover(s)'
    )
    # The completion mark fences the last attempt: should its copy still be
    # running (a paused owner), its progress and its outcome are refused.
    if not supervisor.store.finish(job_id, attempt - 1,
                                   f'{supervisor.hostname}:exhausted'):
        # Another copy failed it already, or it was cancelled: its FAILURE,
        # errbacks and chord are not told twice.
        logger.info(
            'Dropping an exhausted copy of job %s: attempt %d already finished or '
            'the job was cancelled; nothing more is stored.', job_id, attempt - 1,
        )
        return

    def context() -> Any:
        return context_of_message(message, supervisor.app, task, supervisor.hostname)

    # The last attempt may have stored its outcome and died before it claimed
    # completion: that outcome stands.
    stored = store_failure(task.backend, job_id, attempt - 1, exc, context)
    if stored is not None:
        supervisor.store.log(job_id, supervisor.event(
            'finished', attempt - 1, state=stored,
            reason='its outcome was stored before its worker died',
        ))
        announce_now(supervisor, 'finished', job_id, attempt - 1, task.name,
                     worker=supervisor.hostname, state=stored)
        return
    logger.error('Job %s fails for good: %s.', job_id, exc)
    supervisor.store.log(job_id, supervisor.event(
        'failed', attempt - 1, reason=str(exc)))
    announce_now(supervisor, 'finished', job_id, attempt - 1, task.name,
                 worker=supervisor.hostname, state=FAILURE)


def _requeue(message: Message) -> None:
    if not message.acknowledged:
        message.requeue()


class TurnoutRequest(Request):
    """Celery's request for a turnout job, tied to the job in the worker's ledger."""

    turnout_job: HeldJob | None = None

    def __init__(self, message: Message, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        supervisor = supervisor_of(self._app)
        job = supervisor.ledger.get(self.id) if supervisor is not None else None
        headers = message.headers or {}
        if job is None or job.request is not None:
            return
        try:
            attempt = attempt_of(headers)
        except MalformedMessage:
            attempt = 1
        if job.copy != copy_id(headers, self.id, attempt):
            return
        job.request = self
        self.turnout_job = job
        # The pool process reads the attempt from here, not from the message.
        self._request_dict[ATTEMPT_HEADER] = job.attempt
        # Celery builds a request class per task whose own on_success would
        # hide an override here, so the hook goes on the instance.
        self._celery_on_success = self.on_success
        self.__dict__['on_success'] = self._on_success

    def _on_success(self, outcome: Any, **kwargs: Any) -> None:
        self._celery_on_success(outcome, **kwargs)
        job, supervisor = self.turnout_job, supervisor_of(self._app)
        if not outcome[0] and job is not None and supervisor is not None:
            announce_now(supervisor, 'finished', job.id, job.attempt, job.task,
                         worker=supervisor.hostname, state=SUCCESS)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery stops this copy itself, its message not yet acknowledged.

        Celery's cold shutdown does so once its soft shutdown is over; see
        :meth:`Supervisor.copy_cancelled`.
        """
        job, supervisor = self.turnout_job, supervisor_of(self._app)
        if job is not None and supervisor is not None:
            supervisor.copy_cancelled(job)
        super().cancel(pool, signal=signal, emit_retry=emit_retry)

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        """A pool process took the job (runs in the worker's main process)."""
        super().on_accepted(pid, time_accepted)
        job, supervisor = self.turnout_job, supervisor_of(self._app)
        if job is not None and supervisor is not None:
            supervisor.on_accepted(job, pid)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False,
    ) -> None:
        """The job raised, or its pool process died (worker's main process)."""
        job, supervisor = self.turnout_job, supervisor_of(self._app)
        if job is None or supervisor is None:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        exc = getattr(exc_info.exception, 'exc', exc_info.exception)

        if job.released is not None:
            worker_state.task_ready(self)
            # A requeued job's message is the broker's to deliver again.
            if not self.acknowledged and job.released != 'requeued':
                self.acknowledge()
            supervisor.ledger.discard(job)
            logger.info(
                'This worker\'s copy of job %s attempt %d ended (%r) after it was '
                '%s; its outcome is ignored.', job.id, job.attempt, exc, job.released,
            )
            return None

        if isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            reason = f'its pool process on {supervisor.hostname} died ({exc!r})'
            logger.warning(
                'Job %s attempt %d lost its pool process (%r); the worker keeps '
                'serving and re-dispatches the job as attempt %d.',
                job.id, job.attempt, exc, job.attempt + 1,
            )

            def settle() -> None:
                worker_state.task_ready(self)
                if not self.acknowledged:
                    self.acknowledge()
                supervisor.ledger.discard(job)

            job.child_lost = True
            supervisor.redispatch_later(job, reason, settle)
            return None

        supervisor.ledger.discard(job)
        superseded = isinstance(exc, Ignore) and supervisor.store.superseded(
            job.id, job.attempt,
        )
        if superseded:
            # The copy found out by itself that a newer attempt took over (its
            # progress, checkpoint or end was refused) before this worker's
            # next tick read the fence notice: it is fenced all the same.
            job.released = 'fenced'
            supervisor.store.log(job.id, supervisor.event('fenced', job.attempt))
            announce_now(supervisor, 'fenced', job.id, job.attempt, job.task,
                         worker=supervisor.hostname)
        if not isinstance(exc, (Ignore, Retry, Reject, Terminated)):
            announce_now(supervisor, 'finished', job.id, job.attempt, job.task,
                         worker=supervisor.hostname, state=FAILURE)
        return super().on_failure(exc_info, send_failed_event, return_ok)

