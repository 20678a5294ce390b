"""The consumer bootstep that runs turnout inside every Celery worker."""

from __future__ import annotations

import dataclasses
import logging
from queue import Empty
from typing import Any

from celery import bootsteps
from celery.concurrency.solo import TaskPool as SoloPool
from celery.signals import worker_shutdown, worker_shutting_down
from celery.worker import state as worker_state

from .errors import ImproperlyConfigured
from .settings import Settings
from .store import store_for
from .supervision import Supervisor, cold_shutdown_began, register, supervisor_of
from .window import PrefetchWindow

logger = logging.getLogger(__name__)

#: Seconds between runs of the main-thread steps that the supervision thread
#: queues (acknowledging covered jobs, stopping fenced copies).
MAIN_THREAD_PERIOD = 0.2
#: Longest a shutdown waits for its jobs to be re-dispatched.
HANDOFF_TIMEOUT = 10.0
#: Seconds beyond kombu's ``brpop_timeout`` that a leaving worker waits for the
#: answer to its task consumer's last Redis read.
PENDING_READ_SLACK = 2.0

_shutting_down = False


@worker_shutting_down.connect(weak=False)
def _note_shutdown(**_: Any) -> None:
    # Runs inside the signal handler: note it and do nothing else here.
    global _shutting_down
    _shutting_down = True


@worker_shutdown.connect(weak=False)
def _retire(sender: Any = None, **_: Any) -> None:
    # Sent once the pool has drained: a worker that waited for its jobs can
    # now stop supervising without looking dead.
    app = getattr(sender, 'app', None)
    supervisor = supervisor_of(app) if app is not None else None
    if supervisor is not None:
        supervisor.retire()


class Supervision(bootsteps.StartStopStep):
    """Supervise this worker's turnout jobs and monitor everyone else's.

    Starts the supervision thread on the first broker connection and keeps it
    across reconnections of the task consumer, which only releases the jobs
    whose messages the broker will redeliver. On a warm shutdown it hands the
    held jobs off to other workers (``turnout_shutdown = 'handoff'``) or lets
    them finish (``'wait'``). A cold shutdown hands them off in either mode,
    once Celery's soft shutdown (``worker_soft_shutdown_timeout``) is over.
    """

    label = 'Turnout'
    requires = ('celery.worker.consumer.tasks:Tasks',)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.supervisor: Supervisor | None = None
        self.window: PrefetchWindow | None = None
        self._timer: Any = None

    def start(self, c: Any) -> None:
        if self.supervisor is None:
            self.supervisor = self._create(c)
            self.supervisor.start()
            self.window = PrefetchWindow(
                c, self.supervisor.ledger, c.hostname, _leaving,
            )
        # The Events step makes a new dispatcher on every connection.
        self.supervisor.event_dispatcher = getattr(c, 'event_dispatcher', None)
        self._timer = c.timer.call_repeatedly(MAIN_THREAD_PERIOD, self._step)

    def _step(self) -> None:
        # Acknowledging covered jobs frees prefetch slots: the window follows
        # at once, before the event loop reads more task messages.
        assert self.supervisor is not None and self.window is not None
        self.supervisor.run_pending_calls()
        try:
            self.window.adjust()
        except Exception:
            logger.exception(
                'Worker %s could not adjust its prefetch window to the jobs that '
                'wait for a pool process; it may reserve more jobs than it runs '
                'until the next try.', self.supervisor.hostname,
            )

    def _create(self, c: Any) -> Supervisor:
        if isinstance(c.pool, SoloPool):
            raise ImproperlyConfigured(
                'celery-turnout cannot supervise jobs on the solo pool: it runs '
                'jobs on the thread that must acknowledge and fence them. Start '
                'the worker with -P prefork (the default) or -P threads.'
            )
        settings = effective_settings(c.app)
        try:
            store = store_for(c.app)
            store.ping()
        except Exception as exc:
            raise ImproperlyConfigured(
                f'celery-turnout cannot reach its store at {_safe(settings.store_url)} '
                f'({exc!r}); every worker needs it to claim jobs. Check '
                'turnout_store_url and that the store is up.'
            ) from exc
        supervisor = Supervisor(c.app, c.hostname, settings, store, pool=c.pool)
        register(supervisor)
        c.turnout = supervisor
        return supervisor

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        supervisor = self.supervisor
        if supervisor is None:
            return
        if _leaving():
            if cold_shutdown_began():
                # The supervision thread stopped the jobs so that Celery's
                # pool could stop; their re-dispatch may still be under way.
                supervisor.finish_cold_shutdown(HANDOFF_TIMEOUT)
            elif supervisor.settings.shutdown == 'handoff':
                # Stop taking jobs first, or this worker would be handed its own.
                try:
                    if c.task_consumer is not None:
                        c.task_consumer.cancel()
                        _finish_pending_read(c.task_consumer, c.hostname)
                except Exception as exc:
                    logger.warning(
                        'Worker %s could not stop its task consumer before handing '
                        'off its jobs (%r); handing them off anyway.',
                        c.hostname, exc,
                    )
                supervisor.hand_off(HANDOFF_TIMEOUT)
        else:
            supervisor.release_uncovered()
            supervisor.redispatch_unstarted()
        supervisor.run_pending_calls()

    def shutdown(self, c: Any) -> None:
        supervisor = self.supervisor
        if supervisor is None:
            return
        if (
            _leaving() and supervisor.settings.shutdown == 'wait'
            and not cold_shutdown_began()
        ):
            return  # supervision goes on until the pool has drained
        supervisor.stop()
        supervisor.run_pending_calls()


def _finish_pending_read(consumer: Any, hostname: str) -> None:
    """Take in the reply to the read a cancelled Redis consumer has in flight.

    kombu's Redis transport keeps a BRPOP waiting on the server while it
    consumes, and cancelling does not withdraw it: the server hands it the next
    message pushed to the queue, such as a copy this worker is about to hand
    off, and the reply waits unread in the socket until the channel closes,
    which a SIGKILL forestalls. Read now, the message finds no consumer and
    kombu puts it back on the queue. The server answers within the transport's
    ``brpop_timeout`` (one second by default).
    """
    channel = consumer.channel
    # TODO(a public kombu call that settles a cancelled consumer's pending
    # read): these are the Redis channel's private attributes, checked so that
    # another kombu version or transport is merely left as it is.
    finish = getattr(channel, '_brpop_read', None)
    pending = getattr(channel, '_in_poll', None)
    poller = getattr(getattr(channel, 'connection', None), 'cycle', None)
    if (
        finish is None or not pending or not hasattr(pending, 'can_read')
        or getattr(poller, '_in_protected_read', False)
    ):
        return
    # A socket silent for longer than the server's timeout is half open: the
    # read would never end.
    patience = (getattr(channel, 'brpop_timeout', None) or 1) + PENDING_READ_SLACK
    try:
        if pending.can_read(timeout=patience):
            finish()
            return
        problem = f'no answer within {patience:.0f} s'
    except Empty:
        return  # the server's timeout ran out with nothing to hand over
    except Exception as exc:
        problem = repr(exc)
    logger.warning(
        'Worker %s could not take in the pending Redis read of its task consumer '
        '(%s); it hands its jobs off all the same. A copy that read fetches '
        'comes back when the worker\'s connection closes.', hostname, problem,
    )


def _safe(url: str) -> str:
    # The URL without its password, for a log line or an error.
    scheme, sep, rest = url.partition('://')
    credentials, at, host = rest.rpartition('@')
    return f'{scheme}{sep}{"***@" if at else ""}{host}'


def _leaving() -> bool:
    return (
        _shutting_down
        or worker_state.should_stop is not None
        or bool(worker_state.should_terminate)
    )


def effective_settings(app: Any) -> Settings:
    """The app's settings, with the shortest interval any turnout task asks for."""
    from .task import TurnoutTask

    settings = Settings.from_app(app)
    asked = [
        task.supervise_interval for task in app.tasks.values()
        if isinstance(task, TurnoutTask) and task.supervise_interval
    ]
    interval = min([settings.supervise_interval, *asked])
    if interval == settings.supervise_interval:
        return settings
    return dataclasses.replace(
        settings, supervise_interval=interval,
        grace=min(settings.grace, interval / 2),
    )
