"""The supervise/monitor protocol, run by one thread per worker.

Owner side, once per interval at a fixed cadence while the worker holds jobs:

1. read the control queue and obey fence notices (stop the named copies);
2. publish a supervise message into lane ``tick % 2``;
3. publish a monitor message naming every held job, due one interval plus
   the grace from now, to the shared monitor queue;
4. purge the other lane, which holds the previous tick's supervise message;
5. acknowledge the initiating messages of jobs this tick covered first.

Checker side, on every worker (the owner included): hold each monitor message
unacknowledged until it is due, then count the messages in the lane it names.
A live owner purged that lane one tick later, so a message still there means
the owner stopped reading it: send the owner a fence notice, re-dispatch each
job as its next attempt, then acknowledge the monitor message.

The order matters. The evidence of the owner's death (a supervise message in a
lane and a monitor message pointing at it) exists before the previous evidence
is removed and before the job's own message is acknowledged, so there is no
moment at which the owner can die unseen. Duplicates that the broker cannot
rule out (a redelivered initiating message and a takeover, two takeovers of the
same job) are settled by the start claims of :mod:`celery_turnout.store`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.message import Message
from kombu.serialization import prepare_accept_content
from kombu.utils.json import loads as json_loads

from .errors import MalformedMessage
from .events import announce, announce_now
from .faults import fault_point
from .ledger import HeldJob, Ledger
from .messages import (
    ATTEMPT_HEADER,
    COPY_HEADER,
    Fence,
    Monitor,
    StoredMessage,
    supervise_body,
)
from .progress import ProgressWatch
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)

#: Header naming why a copy was re-dispatched.
REASON_HEADER = 'turnout_reason'

#: Seconds between reconnection attempts of the supervision thread.
RECONNECT_DELAY = 1.0
#: Longest the supervision thread sleeps before it looks at its work again.
MAX_WAIT = 0.25
#: Most monitor checks one worker claims from the board at a time.
CLAIM_LIMIT = 100
#: Most jobs a tick names one by one in its log; more are summed up in a line.
COVER_LOG_LIMIT = 5
#: Most foreign messages a check drops from a lane before it gives up on it.
PEEK_LIMIT = 10
#: Seconds a peer's clock may run ahead of this worker's before its monitor
#: messages count as malformed.
CLOCK_SKEW_LIMIT = 10.0


@dataclass(order=True)
class _Pending:
    """A monitor message held until it comes due."""

    due: float
    seq: int
    monitor: Monitor = field(compare=False)
    message: Message = field(compare=False)


class _Session:
    """The channels and queues of one broker connection."""

    def __init__(self, connection: Connection, supervisor: Supervisor) -> None:
        settings = supervisor.settings
        self.connection = connection
        self.channel = connection.channel()
        self.consume_channel = connection.channel()
        self._probe: Any = None
        self.producer = Producer(self.channel, serializer=supervisor.serializer)
        expires = self.expires_ms = int(settings.queue_expires * 1000)
        self.lanes = tuple(
            _worker_queue(name, expires) for name in supervisor.names.lanes
        )
        self.control = _worker_queue(supervisor.names.control, expires)
        self.monitor = Queue(
            supervisor.names.monitor, Exchange(''),
            routing_key=supervisor.names.monitor,
            durable=True, auto_delete=False,
            queue_arguments={'x-expires': int(settings.monitor_queue_expires * 1000)},
        )
        self.declared_at = 0.0

    def declare(self, monitor: bool) -> None:
        """Declare (or refresh the expiry of) this worker's queues."""
        queues = (*self.lanes, self.control, *((self.monitor,) if monitor else ()))
        for q in queues:
            q.bind(self.channel).declare()
        self.declared_at = time.monotonic()

    def publish(self, body: dict[str, Any], queue_name: str) -> None:
        """Publish a persistent turnout message straight into a queue."""
        self.producer.publish(
            body, exchange='', routing_key=queue_name, delivery_mode=2,
        )

    def purge(self, lane: Queue) -> None:
        lane.bind(self.channel).purge()

    def next_control_message(self, accept: list[str]) -> Message | None:
        """The next message on this worker's control queue, unacknowledged."""
        return self.control.bind(self.channel).get(no_ack=False, accept=accept)

    def count(self, queue_name: str) -> int:
        """Ready messages in a queue; 0 when the broker says it does not exist.

        RabbitMQ closes the channel of a failed passive declare, so probes use
        a channel of their own. Redis reports an empty list as missing.
        """
        if self.connection.transport.driver_type == 'redis':
            # kombu's existence check ignores a global_keyprefix, so a declare
            # would find every lane missing: read the list's length instead
            # (kombu's client prefixes LLEN itself).
            return int(self.channel.client.llen(queue_name))
        if self._probe is None:
            self._probe = self.connection.channel()
        try:
            _, count, _ = self._probe.queue_declare(queue=queue_name, passive=True)
        except self.connection.channel_errors:
            self._close_probe()
            return 0
        return int(count)

    def peek_tick(self, queue_name: str, accept: list[str]) -> int | None:
        """The tick of the first supervise message in a lane, which stays there.

        A lane is private to its owner: foreign messages ahead of the first
        supervise message are dropped, so that they cannot pass for one.
        """
        if self.connection.transport.driver_type in ('redis', 'filesystem'):
            return self._peek_tick_in_place(queue_name, accept)
        # RabbitMQ returns a taken message to the lane as soon as the channel
        # of a checker that dies holding it closes.
        lane = Queue(
            queue_name, Exchange(''), routing_key=queue_name, no_declare=True,
        ).bind(self.channel)
        for _ in range(PEEK_LIMIT):
            try:
                message = lane.get(no_ack=False, accept=accept)
            except self.connection.channel_errors:
                return None
            if message is None:
                return None
            tick = _supervise_tick(message)
            if tick is not None:
                message.requeue()
                self.keep_expiry(queue_name)
                return tick
            logger.error(
                'Dropping a foreign message (content type %r) from supervise lane '
                '%s.', message.content_type, queue_name,
            )
            message.ack()
        return None

    def _peek_tick_in_place(self, queue_name: str, accept: list[str]) -> int | None:
        """:meth:`peek_tick` on Redis and the filesystem, reading the lane in place.

        Taking the message and putting it back would leave it with a checker
        that dies in between (on Redis until the visibility timeout, on the
        filesystem for good): the next checker would find the lane of a dead
        owner empty and let its jobs go.
        """
        allowed = prepare_accept_content(accept)
        for raw, drop in self._oldest(queue_name):
            try:
                message = self.channel.Message(
                    json_loads(raw), channel=self.channel, accept=allowed,
                )
            except Exception:  # not even a kombu envelope
                message = None
            tick = None if message is None else _supervise_tick(message)
            if tick is not None:
                return tick
            logger.error(
                'Dropping a foreign message (content type %r) from supervise lane '
                '%s.', getattr(message, 'content_type', None), queue_name,
            )
            drop()
        return None

    def _oldest(self, queue_name: str) -> Iterator[tuple[bytes, Callable[[], Any]]]:
        """The lane's oldest raw messages, oldest first, each with its removal."""
        channel = self.channel
        if self.connection.transport.driver_type == 'redis':
            # kombu pushes on the left and takes from the right.
            client = channel.client
            key = _redis_key(client, queue_name)
            for raw in reversed(client.lrange(key, -PEEK_LIMIT, -1)):
                yield raw, functools.partial(client.lrem, key, -1, raw)
            return
        # kombu's filesystem transport keeps a file per message, named after
        # the time it was put and its queue.
        folder = Path(channel.data_folder_in)
        names = sorted(
            name for name in os.listdir(folder)
            if name.partition('.')[2] == f'{queue_name}.msg'
        )
        for name in names[:PEEK_LIMIT]:
            path = folder / name
            try:
                raw = path.read_bytes()
            except OSError:  # taken in the meantime
                continue
            yield raw, functools.partial(path.unlink, missing_ok=True)

    def keep_expiry(self, queue_name: str) -> None:
        """Give another worker's queue the expiry its owner declared, on Redis.

        RabbitMQ keeps a queue's expiry whoever publishes into it. A Redis
        list that a peer pushes into (a fence notice into an empty control
        queue, a supervise message put back into a lane) is a new key with no
        expiry, which would outlive a dead owner for good.
        """
        if self.connection.transport.driver_type == 'redis':
            self.channel.client.pexpire(queue_name, self.expires_ms)

    def _close_probe(self) -> None:
        try:
            self._probe.close()
        except Exception:  # already closed by the broker
            pass
        self._probe = None


def _redis_key(client: Any, queue_name: str) -> str:
    # kombu adds a global_keyprefix transport option only to the commands it
    # knows; LRANGE and LREM issued here must add it themselves.
    return getattr(client, 'global_keyprefix', '') + queue_name


def _supervise_tick(message: Message) -> int | None:
    try:
        body = message.decode()
    except Exception:  # undecodable: not a supervise message
        return None
    if not isinstance(body, dict) or body.get('kind') != 'supervise':
        return None
    tick = body.get('tick')
    # Ticks count up from 0; anything else did not come from an owner.
    valid = isinstance(tick, int) and not isinstance(tick, bool) and tick >= 0
    return tick if valid else None


def _worker_queue(name: str, expires_ms: int) -> Queue:
    # Durable with an expiry: RabbitMQ 4 refuses transient shared queues, and
    # the queues of a dead worker incarnation disappear by themselves.
    return Queue(
        name, Exchange(''), routing_key=name, durable=True, auto_delete=False,
        queue_arguments={'x-expires': expires_ms},
    )


@dataclass(frozen=True)
class QueueNames:
    """The names of the queues one worker incarnation uses."""

    prefix: str
    worker_id: str

    @property
    def lanes(self) -> tuple[str, str]:
        base = f'{self.prefix}.supervise.{self.worker_id}'
        return (f'{base}.0', f'{base}.1')

    @property
    def control(self) -> str:
        return f'{self.prefix}.control.{self.worker_id}'

    @property
    def monitor(self) -> str:
        return f'{self.prefix}.monitor'


class Supervisor:
    """Supervises this worker's jobs and monitors every other worker's.

    The worker's main thread calls the methods documented as main-thread
    methods; everything that talks to the broker runs on a thread of its own
    with its own connection, so a busy pool or a blocked event loop cannot
    delay a tick or a check.
    """

    def __init__(
        self, app: Celery, hostname: str, settings: Settings, store: Store,
        pool: Any = None,
    ) -> None:
        self.app = app
        self.hostname = hostname
        self.settings = settings
        self.store = store
        self.pool = pool
        self.worker_id = f'{hostname}.{uuid.uuid4().hex[:8]}'
        self.names = QueueNames(settings.queue_prefix, self.worker_id)
        self.ledger = Ledger()
        self.serializer = app.conf.task_serializer
        self.accept = list(app.conf.accept_content or [self.serializer])
        #: When the last tick proved this worker alive (epoch seconds).
        self.proven_at: float | None = None
        #: The worker's Celery event dispatcher, set by the bootstep on each
        #: connection; it sends turnout's events when the worker runs with -E.
        self.event_dispatcher: Any = None
        self.progress_watch = ProgressWatch(self, self._redispatch)

        self._calls: deque[Callable[[], None]] = deque()
        self._commands: queue.SimpleQueue[Callable[[_Session], None]] = (
            queue.SimpleQueue()
        )
        self._stopping = threading.Event()
        self._handed_off_cold = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[_Pending] = []
        self._seq = itertools.count()
        self._tick_no = 0
        #: When the control queue was last read, on the monotonic clock and on
        #: the wall clock (which also runs while the host is suspended, as the
        #: broker's expiry of the queue does); None before the first read.
        self._fences_read_at: tuple[float, float] | None = None
        self._last_lane: Queue | None = None
        self._origin = time.monotonic()
        self._next_tick = self._origin + settings.supervise_interval
        self._checks_from = 0.0
        self._next_board_poll = 0.0
        # RabbitMQ returns a dead consumer's unacknowledged messages at once,
        # so checks wait as held messages of a shared monitor queue. Redis
        # returns them only after its visibility timeout and the filesystem
        # transport never does: there, checks wait on the store's board.
        self._driver = app.connection_for_write().transport.driver_type
        self._board: Store | None = None if self._driver == 'amqp' else store

    # -- the worker's main thread -------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker's main thread (thread-safe)."""
        self._calls.append(fn)

    def run_pending_calls(self) -> None:
        """Run what other threads queued with :meth:`call_soon`. Main thread."""
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                logger.exception('Turnout: a main-thread step failed: %r', fn)

    def stop_copy(self, job: HeldJob) -> None:
        """Stop this worker's copy of a released job. Main thread.

        A copy still waiting for a pool process is stopped when a process
        accepts it (see :meth:`on_accepted`).
        """
        request = job.request
        if request is None:
            return
        self._kill_running_copy(job)
        if not request.acknowledged:
            request.acknowledge()

    def _kill_running_copy(self, job: HeldJob) -> None:
        """Kill the pool process running ``job``'s copy, if it still runs it."""
        request = job.request
        pid = getattr(request, 'worker_pid', None)
        # Only while the copy still runs there: a pool process that finished it
        # may already run another job, which must not die in its place.
        if pid and request in worker_state.active_requests:
            self._kill(job, pid)

    def on_accepted(self, job: HeldJob, pid: int) -> None:
        """A pool process began running ``job``. Main thread."""
        job.started = time.time()
        job.seen = True
        if job.released is not None:
            self._kill(job, pid)
            return
        announce_now(self, 'started', job.id, job.attempt, job.task,
                     worker=self.hostname)

    def _kill(self, job: HeldJob, pid: int) -> None:
        try:
            self.pool.terminate_job(pid, signal.SIGKILL)
        except NotImplementedError:
            logger.warning(
                'Job %s attempt %d was %s, but the %s pool cannot stop a running '
                'job: this copy runs on until it calls raise_if_superseded() or '
                'finishes, and its result will be dropped.',
                job.id, job.attempt, job.released, type(self.pool).__name__,
            )
        else:
            logger.info(
                'Stopped this worker\'s copy of job %s attempt %d (pool process '
                '%d): it was %s.', job.id, job.attempt, pid, job.released,
            )

    def release(self, job: HeldJob, reason: str, **detail: Any) -> None:
        """Give ``job`` up: no tick names it again and its copy is stopped."""
        if job.released is not None:
            return
        job.released = reason
        self.store.log(job.id, self.event(reason, job.attempt, **detail))
        self.call_soon(lambda: self.stop_copy(job))

    def release_uncovered(self) -> None:
        """Release jobs whose initiating message is not yet acknowledged. Main thread.

        Called when the worker's task connection is lost: the broker gives
        those messages to another worker, which starts them as the next
        attempt, so this worker's copies must stop.
        """
        if self._driver not in ('amqp', 'redis'):
            return  # other transports do not redeliver what they handed out
        for job in self.ledger.held():
            if not job.covered:
                logger.warning(
                    'Job %s attempt %d was not yet covered by a supervise tick when '
                    'the task connection was lost; the broker will redeliver it, so '
                    'this worker stops its copy.', job.id, job.attempt,
                )
                job.released = 'requeued'
                self.stop_copy(job)

    def redispatch_unstarted(self) -> None:
        """Have the next tick re-dispatch the acknowledged jobs no process took.

        Main thread. Called when the worker's task connection is lost, after
        Celery dropped every job that waits for a pool process, its ETA or its
        rate limit, counting on the broker to deliver them again. Turnout
        acknowledged them at their first tick, so the broker never will. The
        next tick, once the broker is back, finds them in none of Celery's
        request lists and re-dispatches them (see :meth:`_prune_finished`);
        they stay supervised until then.
        """
        for job in self.ledger.held():
            request = job.request
            if job.started is None and request is not None and request.acknowledged:
                job.seen = True

    def copy_cancelled(self, job: HeldJob) -> None:
        """Celery stops ``job``'s copy before its message is acknowledged. Main thread.

        Celery's cold shutdown does so to every running job whose message is
        not yet acknowledged, and so does a lost connection when
        ``worker_cancel_long_running_tasks_on_connection_loss`` is set, leaving
        the message to the broker. Turnout must then not acknowledge it, even
        when a tick covered the job while Celery waited out its soft shutdown:
        the broker delivers it again and the start claim makes it the next
        attempt. A transport that never delivers a message twice gets the job
        re-dispatched instead.
        """
        if job.released is not None:
            return
        if self._driver in ('amqp', 'redis'):
            job.released = 'requeued'
            logger.warning(
                'Worker %s stops job %s attempt %d before its message was '
                'acknowledged; the broker delivers that message again and a '
                'worker starts it as attempt %d.', self.hostname, job.id,
                job.attempt, job.attempt + 1,
            )
            return
        job.released = 'handed_off'
        logger.warning(
            'Worker %s stops job %s attempt %d before its message was '
            'acknowledged; the %s transport will not deliver it again, so it is '
            're-dispatched now.', self.hostname, job.id, job.attempt, self._driver,
        )

        def command(session: _Session) -> None:
            self._redispatch(
                session, job.id, job.attempt, 'handed_off',
                f'Celery stopped it on worker {self.hostname}', by=self.hostname,
            )

        self._commands.put(command)

    def hand_off(self, timeout: float) -> None:
        """Stop every held job and re-dispatch it at once. Main thread.

        Used on a warm shutdown, so that peers need not wait for the detection
        bound. Copies are stopped first, then re-dispatched; only then are both
        lanes purged and the messages of jobs no tick covered yet acknowledged.
        A worker killed half way leaves its lanes as they were: the monitor
        messages already out take over the covered jobs, and the broker returns
        the messages of the others.
        """
        jobs = self.ledger.release_held('handed_off')
        for job in jobs:
            self._kill_running_copy(job)
        fault_point('handoff.after_stop')
        done = threading.Event()

        def command(session: _Session) -> None:
            self._pass_on(session, jobs, f'worker {self.hostname} shut down')
            done.set()

        if jobs:
            logger.warning(
                'Worker %s is shutting down: handing off %d turnout job(s) %s '
                'to other workers now.', self.hostname, len(jobs),
                ', '.join(job.id for job in jobs),
            )
            self._commands.put(command)
            if done.wait(timeout):
                _acknowledge(jobs)
            else:
                for job in jobs:
                    if not job.covered:
                        job.released = 'requeued'  # never acknowledged now
                logger.error(
                    'Worker %s could not hand off its jobs within %.0f s; the '
                    'monitor messages already sent re-dispatch the covered ones '
                    'once peers see this worker gone, and the broker returns the '
                    'others when the connection closes.', self.hostname, timeout,
                )
        self.stop()

    def retire(self, timeout: float = 5.0) -> None:
        """Stop supervising at the end of a shutdown that waited for its jobs.

        Lanes are purged only when nothing is held any more, so that peers do
        not mistake the exit for a crash; jobs still held are left to them.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()

        def command(session: _Session) -> None:
            held = self.ledger.held()
            if held:
                logger.warning(
                    'Worker %s leaves with %d turnout job(s) unfinished: %s; '
                    'peers take them over within %.3g s.', self.hostname,
                    len(held), ', '.join(job.id for job in held),
                    self.settings.detection_bound,
                )
            else:
                for lane in session.lanes:
                    session.purge(lane)
            done.set()

        self._commands.put(command)
        done.wait(timeout)
        self.stop()

    def finish_cold_shutdown(self, timeout: float) -> None:
        """Wait for the supervision thread to hand the jobs off, then stop it.

        Main thread, when Celery's cold shutdown stops the consumer; the
        hand-off itself is :meth:`_hand_off_cold`, on the supervision thread.
        """
        thread = self._thread
        if (
            thread is not None and thread.is_alive()
            and not self._handed_off_cold.wait(timeout)
        ):
            logger.error(
                'Worker %s could not hand off its jobs within %.0f s of its cold '
                'shutdown; the monitor messages already sent will re-dispatch '
                'them once peers see this worker gone.', self.hostname, timeout,
            )
        self.stop()

    def redispatch_later(
        self, job: HeldJob, reason: str, then: Callable[[], None],
    ) -> None:
        """Re-dispatch ``job`` as its next attempt, then call ``then`` (main thread).

        The job stays held (and so supervised) until the copy is published.
        """
        def command(session: _Session) -> None:
            self._redispatch(
                session, job.id, job.attempt, 'child_lost', reason, by=self.hostname,
            )
            self.call_soon(then)

        self._commands.put(command)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the supervision thread (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name='turnout-supervisor', daemon=True,
        )
        self._thread.start()
        logger.info(
            'Turnout supervision started for worker %s: supervise lanes %s, '
            'interval %.3g s, a dead worker is detected within %.3g s.',
            self.worker_id, ' and '.join(self.names.lanes),
            self.settings.supervise_interval, self.settings.detection_bound,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the supervision thread and wait for it."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the supervision thread ----------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            if cold_shutdown_began():
                # Between two connections: stop the jobs all the same.
                self._hand_off_cold(None)
                break
            connection = self._connect()
            try:
                connection.ensure_connection(max_retries=1)
                self._serve(connection)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if isinstance(exc, tuple(connection.recoverable_connection_errors)
                              + tuple(connection.connection_errors)
                              + (socket.error, OperationalError)):
                    logger.warning(
                        'Turnout supervision of worker %s lost the broker (%r); '
                        'reconnecting in %.0f s. Held jobs keep running.',
                        self.worker_id, exc, RECONNECT_DELAY,
                    )
                else:
                    logger.exception(
                        'Turnout supervision of worker %s failed; restarting it '
                        'in %.0f s. Held jobs keep running.',
                        self.worker_id, RECONNECT_DELAY,
                    )
                self._stopping.wait(RECONNECT_DELAY)
            finally:
                self._pending.clear()
                connection.release()

    def _connect(self) -> Connection:
        options: dict[str, Any] = {}
        if self._driver == 'filesystem':
            options = {'polling_interval': 0.1}
        # RabbitMQ returns the monitor messages a consumer holds only when its
        # connection dies. Short heartbeats make a stopped or hung worker's
        # connection die within a few seconds, so the checks it held (its own
        # included) go to a live peer.
        heartbeat = max(1, round(self.settings.supervise_interval / 2))
        return self.app.connection_for_write(
            transport_options=options, heartbeat=heartbeat,
        )

    def _serve(self, connection: Connection) -> None:
        session = _Session(connection, self)
        session.declare(monitor=self._board is None)
        # Peers that were cut off with us need a tick to prove themselves.
        self._checks_from = time.time() + self.settings.detection_bound
        self._next_board_poll = 0.0
        consumer = Consumer(
            session.consume_channel, [session.monitor] if self._board is None else [],
            accept=self.accept, callbacks=[self._on_monitor],
            on_decode_error=self._on_undecodable,
            prefetch_count=self.settings.monitor_prefetch,
        )
        with consumer:
            while not self._stopping.is_set():
                self._run_commands(session)
                if cold_shutdown_began():
                    self._hand_off_cold(session)
                    return
                self._tick_if_due(session)
                self._check_due(session)
                try:
                    connection.drain_events(timeout=self._wait_time())
                except TimeoutError:
                    pass
                connection.heartbeat_check()

    def _hand_off_cold(self, session: _Session | None) -> None:
        """Stop every held job and re-dispatch it: Celery's cold shutdown began.

        Celery's cold-shutdown handler runs on the main thread: it waits out
        ``worker_soft_shutdown_timeout``, stops the running copies whose message
        is not yet acknowledged (see :meth:`copy_cancelled`), then stops the
        pool, which waits for every other job to finish. Covered turnout jobs
        are acknowledged, so it would wait for them however long they run, and
        the main thread, blocked there, cannot stop them. This thread does,
        whatever ``turnout_shutdown`` says, and re-dispatches them as
        :meth:`hand_off` does. Without a broker connection (``session`` is
        None) it only stops them, and the monitor messages already out take
        them over once peers see this worker gone.
        """
        if session is not None:
            self._run_commands(session)  # re-dispatches queued meanwhile
        jobs = self.ledger.release_held('handed_off')
        if jobs:
            logger.warning(
                'Worker %s is in a cold shutdown and its soft shutdown is over: '
                'stopping %d turnout job(s) %s and handing them off to other '
                'workers now.', self.hostname, len(jobs),
                ', '.join(job.id for job in jobs),
            )
        for job in jobs:
            self._kill_running_copy(job)
        fault_point('handoff.after_stop')
        if session is None:
            if jobs:
                logger.error(
                    'Worker %s has no broker connection to hand off %s; peers take '
                    'over the covered ones within %.3g s once they see it gone.',
                    self.hostname, ', '.join(job.id for job in jobs),
                    self.settings.detection_bound,
                )
        else:
            # TODO(settle the task consumer's pending Redis read first, as the
            # warm hand-off does, once the main thread can be asked to while it
            # waits on the pool): until then this worker's own consumer may
            # fetch a copy it hands off here: the copy comes back when the
            # connection closes, and is lost if a SIGKILL comes first.
            self._pass_on(session, jobs, f'worker {self.hostname} shut down (cold)')
            # Jobs still waiting for a pool process may be unacknowledged; their
            # messages go only now that their next attempt is out.
            self.call_soon(lambda: _acknowledge(jobs))
        self._handed_off_cold.set()
        self._stopping.set()

    def _pass_on(self, session: _Session, jobs: list[HeldJob], reason: str) -> None:
        """Re-dispatch the jobs of a leaving worker, then purge both its lanes."""
        for job in jobs:
            self._redispatch(
                session, job.id, job.attempt, 'handed_off', reason, by=self.hostname,
            )
        fault_point('handoff.after_redispatch')
        for lane in session.lanes:
            session.purge(lane)
        self._last_lane = None

    def _run_commands(self, session: _Session) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command(session)

    def _tick_if_due(self, session: _Session) -> None:
        if time.monotonic() >= self._next_tick:
            self._tick(session)
            self._schedule_tick()
            self.progress_watch.poll(session)

    def _current_slot(self) -> float:
        interval = self.settings.supervise_interval
        periods = math.floor((time.monotonic() - self._origin) / interval)
        return self._origin + periods * interval

    def _schedule_tick(self) -> None:
        interval = self.settings.supervise_interval
        periods = math.floor((time.monotonic() - self._origin) / interval) + 1
        self._next_tick = self._origin + periods * interval

    def _wait_time(self) -> float:
        wait = self._next_tick - time.monotonic()
        if self._pending:
            wait = min(wait, self._after_grace(self._pending[0].due))
        if self._board is not None:
            wait = min(wait, self._after_grace(self._next_board_poll))
        return max(0.0, min(wait, MAX_WAIT))

    def _after_grace(self, due: float) -> float:
        return max(due, self._checks_from) - time.time()

    # owner side

    def _tick(self, session: _Session) -> None:
        self._prune_finished(session)
        self._read_fences(session)
        jobs = self.ledger.held()
        if time.monotonic() - session.declared_at > self.settings.queue_expires / 4:
            session.declare(monitor=self._board is None)
        if not jobs:
            if self._last_lane is not None:
                session.purge(self._last_lane)
                self._last_lane = None
            return

        tick = self._tick_no
        self._tick_no += 1
        lane, previous = session.lanes[tick % 2], session.lanes[(tick + 1) % 2]
        now = time.time()
        # The check is due one interval plus the grace after this tick's slot
        # on the cadence, not after the moment the tick ran: a tick that runs
        # late must not push its check past the next use of the same lane.
        slot = now - (time.monotonic() - self._current_slot())
        session.publish(supervise_body(self.worker_id, tick), lane.name)
        fault_point('tick.after_supervise')
        monitor = Monitor(
            owner=self.worker_id, lane=lane.name, control=session.control.name,
            tick=tick, due=slot + self.settings.detection_bound,
            jobs=tuple((job.id, job.attempt) for job in jobs),
        )
        if self._board is None:
            session.publish(monitor.to_body(), session.monitor.name)
        else:
            self._board.post_check(monitor.due, json.dumps(monitor.to_body()))
        fault_point('tick.after_monitor')
        session.purge(previous)
        fault_point('tick.after_purge')
        self._last_lane = lane
        self.proven_at = now

        fresh = [job for job in jobs if not job.covered]
        if fresh:
            self._cover(fresh, tick)

    def _cover(self, fresh: list[HeldJob], tick: int) -> None:
        for job in fresh:
            job.covered = True
        # A job acknowledged here before a pool process took it frees a
        # prefetch slot; the bootstep's PrefetchWindow withholds that slot.
        self.call_soon(lambda: _acknowledge(fresh))
        # One store round trip and a bounded number of log lines, however many
        # jobs arrived: a slow tick would look like a dead worker.
        self.store.log_many(
            [(job.id, self.event('covered', job.attempt, tick=tick)) for job in fresh],
        )
        if len(fresh) > COVER_LOG_LIMIT:
            logger.info(
                '%d jobs are covered by supervise tick %d of worker %s, among them '
                '%s; their messages are acknowledged and a dead worker is now '
                'detected within %.3g s.', len(fresh), tick, self.worker_id,
                ', '.join(job.id for job in fresh[:COVER_LOG_LIMIT]),
                self.settings.detection_bound,
            )
            return
        for job in fresh:
            logger.info(
                'Job %s attempt %d is covered by supervise tick %d of worker %s; '
                'its message is acknowledged and a dead worker is now detected '
                'within %.3g s.', job.id, job.attempt, tick, self.worker_id,
                self.settings.detection_bound,
            )

    def _prune_finished(self, session: _Session) -> None:
        dropped: list[HeldJob] = []

        def finished(job: HeldJob) -> bool:
            request = job.request
            if request is None or not job.seen:
                return False
            if (
                request in worker_state.reserved_requests
                or request in worker_state.active_requests
                or request in worker_state.scheduled_requests
            ):
                return False
            if job.id in worker_state.revoked:
                # Revoked or expired while it waited (Celery files an expired
                # job as revoked too): the revoke is durable in the store.
                return True
            if job.released is None and job.started is None and request.acknowledged:
                dropped.append(job)
                return False
            return True

        self.ledger.prune(finished)
        for job in dropped:
            self._redispatch_dropped(session, job)

    def _redispatch_dropped(self, session: _Session, job: HeldJob) -> None:
        """Re-dispatch a job that Celery let go of before any process ran it.

        Celery forgets the jobs waiting for a pool process or for their ETA
        when its task connection is lost, counting on the broker to deliver
        them again; turnout acknowledged them at their first tick, so the
        broker never will. A job revoked or expired while it waited is let go
        of too, but it is in Celery's revoked set and never comes here.
        """
        # _redispatch skips, and says so, a job that is already finished,
        # cancelled or superseded.
        self._redispatch(
            session, job.id, job.attempt, 'handed_off',
            f'worker {self.hostname} dropped it before a pool process started it '
            '(a lost broker connection drops the jobs that wait)', by=self.hostname,
        )
        # Held until the copy is out, so that a failed publish is tried again
        # at the next tick; a copy that still reaches a pool process is
        # stopped there.
        job.released = 'handed_off'
        self.ledger.discard(job)

    def _read_fences(self, session: _Session) -> None:
        began = (time.monotonic(), time.time())
        while True:
            message = session.next_control_message(self.accept)
            if message is None:
                break
            try:
                fence = Fence.from_body(message.decode())
            except Exception as exc:
                logger.error(
                    'Dropping a malformed message from control queue %s: %s.',
                    session.control.name, exc,
                )
            else:
                self._obey(session, fence)
            message.ack()
        # The broker drops a control queue left unused for turnout_queue_expires,
        # with the notices in it. Half of that is well inside what any queue
        # this worker last read or declared is kept for.
        if self._fences_read_at is not None:
            (monotonic, wall), (last_monotonic, last_wall) = (
                began, self._fences_read_at)
            silence = max(monotonic - last_monotonic, wall - last_wall)
            if silence > self.settings.queue_expires / 2:
                self._read_kept_fences(session, silence)
        self._fences_read_at = began

    def _read_kept_fences(self, session: _Session, silence: float) -> None:
        """Obey the fence notices the store kept for this worker."""
        logger.warning(
            'Worker %s read no control queue for %.0f s, long enough for the '
            'broker to drop its queues (turnout_queue_expires is %g s); it reads '
            'the fence notices kept in the store and stops every copy they name.',
            self.worker_id, silence, self.settings.queue_expires,
        )
        for body in self.store.kept_fences(self.worker_id):
            try:
                fence = Fence.from_body(json.loads(body))
            except (ValueError, MalformedMessage) as exc:
                logger.error(
                    'Dropping a malformed fence notice that the store kept for '
                    'worker %s: %s.', self.worker_id, exc,
                )
                continue
            self._obey(session, fence)

    def _obey(self, session: _Session, fence: Fence) -> None:
        for job_id, attempt in fence.jobs:
            job = self.ledger.get(job_id)
            if job is None or job.released is not None or job.attempt > attempt:
                continue
            logger.warning(
                'Job %s attempt %d was taken over by %s (%s): this worker was '
                'presumed dead, so it stops its copy now.',
                job_id, job.attempt, fence.by, fence.reason,
            )
            # The checker sends the fence notice before it re-dispatches; if it
            # died in between, nobody else would. So the owner re-dispatches the
            # job too, before it acknowledges the job's message and before its
            # tick goes on; the start claim lets one of the two copies run.
            self._redispatch(
                session, job.id, job.attempt, 'taken_over',
                f'{fence.reason}; re-dispatched by the fenced owner in case '
                f'{fence.by} could not', worker=self.hostname, by=self.hostname,
            )
            self.release(job, 'fenced', by=fence.by)
            announce(self, 'fenced', job.id, job.attempt, job.task,
                     worker=self.hostname, by=fence.by, reason=fence.reason)

    # checker side

    def _on_monitor(self, body: Any, message: Message) -> None:
        try:
            monitor = self._parse_monitor(body)
        except MalformedMessage as exc:
            logger.error(
                'Dropping a malformed message from monitor queue %s: %s.',
                self.names.monitor, exc,
            )
            message.ack()
            return
        # A check is due one interval and a grace after its tick. One held
        # until a far later due time would keep a prefetch slot from the checks
        # that matter, and enough of them would stop detection on this worker.
        # TODO(keep checks that are not due yet out of the prefetch window, for
        # instance in per-slot delay queues): a steady stream of checks due
        # just inside this limit still delays detection while it lasts.
        ahead = monitor.due - time.time()
        settings = self.settings
        if ahead > settings.supervise_interval + settings.detection_bound + (
            CLOCK_SKEW_LIMIT
        ):
            logger.error(
                'Dropping the monitor message of tick %d of worker %s: it is due '
                'in %.0f s, too far ahead for a supervise interval of %.3g s. That '
                'worker\'s clock runs ahead of this one\'s, its interval is longer, '
                'or the message is forged; this check of its jobs is not made.',
                monitor.tick, monitor.owner, ahead, settings.supervise_interval,
            )
            message.ack()
            return
        heapq.heappush(
            self._pending, _Pending(monitor.due, next(self._seq), monitor, message),
        )

    def _parse_monitor(self, body: Any) -> Monitor:
        monitor = Monitor.from_body(body)
        # A check may only send fences to, and count, turnout's own queues.
        prefix = self.settings.queue_prefix
        if not (
            monitor.lane.startswith(f'{prefix}.supervise.')
            and monitor.control.startswith(f'{prefix}.control.')
        ):
            raise MalformedMessage(
                f'queues {monitor.lane!r:.80} and {monitor.control!r:.80} are not '
                f'turnout queues of prefix {prefix!r}'
            )
        return monitor

    def _on_undecodable(self, message: Message, exc: Exception) -> None:
        logger.error(
            'Dropping a message on monitor queue %s that cannot be decoded '
            '(content type %r): %r.', self.names.monitor, message.content_type, exc,
        )
        message.ack()

    def _check_due(self, session: _Session) -> None:
        now = time.time()
        if now < self._checks_from:
            return
        while self._pending and self._pending[0].due <= now:
            pending = heapq.heappop(self._pending)
            if self._is_own_and_covered(session, pending.monitor, now):
                pass
            elif self._owner_is_gone(session, pending.monitor, now):
                self._take_over(session, pending.monitor)
            pending.message.ack()
        if self._board is not None and now >= self._next_board_poll:
            self._check_board(session, now)

    def _check_board(self, session: _Session, now: float) -> None:
        board = self._board
        assert board is not None
        # A long takeover must not outlive its lease, or a second checker
        # repeats it; a lease of two detection bounds leaves room.
        checks, upcoming = board.claim_checks(
            now, 2 * self.settings.detection_bound, CLAIM_LIMIT,
        )
        for token, body in checks:
            try:
                monitor = self._parse_monitor(json.loads(body))
            except (ValueError, MalformedMessage) as exc:
                logger.error('Dropping a malformed monitor check: %s.', exc)
            else:
                now = time.time()
                if self._is_own_and_covered(session, monitor, now):
                    pass
                elif self._owner_is_gone(session, monitor, now):
                    self._take_over(session, monitor)
            board.complete_check(token)
        # Anything posted from now on comes due one detection bound later at
        # the earliest, so the board need not be asked again before that.
        wake = now + self.settings.detection_bound
        if checks and len(checks) >= CLAIM_LIMIT:
            wake = now
        elif upcoming is not None:
            wake = min(wake, upcoming)
        self._next_board_poll = wake

    def _is_own_and_covered(
        self, session: _Session, monitor: Monitor, now: float,
    ) -> bool:
        """True for a check of this worker's own tick, once a later tick is out.

        A worker that checks itself is alive, whatever its lane says: taking
        its own jobs over would only stop them and run them again. The check
        goes once a later tick's monitor message names every job still held.
        Normally that tick ran before the check came due; a thread that was
        held up runs it now, and so does a worker whose wall clock (which due
        times use) stepped ahead of its tick cadence.
        """
        if monitor.owner != self.worker_id:
            return False
        self._tick_if_due(session)
        if self._tick_no <= monitor.tick + 1 and self.ledger.held():
            logger.warning(
                'Worker %s got the check of its own supervise tick %d before its '
                'next tick was due: the wall clock moved ahead of the tick '
                'cadence, and peers may take its jobs over early. It ticks now.',
                self.worker_id, monitor.tick,
            )
            self._tick(session)
            self._schedule_tick()
        late = now - monitor.due
        if late > self.settings.grace:
            logger.warning(
                'Worker %s checked its own supervise tick %d %.1f s after it was '
                'due: its supervision thread was held up (a starved CPU, a '
                'blocked process or a lost broker connection); a peer checking that '
                'tick would have taken its '
                '%d job(s) over.', self.worker_id, monitor.tick, late,
                len(monitor.jobs),
            )
        return True

    def _owner_is_gone(self, session: _Session, monitor: Monitor, now: float) -> bool:
        settings = self.settings
        # The owner puts its next supervise message into the same lane one
        # interval after the check was due; a check that late must look at
        # which tick the message in the lane comes from.
        stale_after = monitor.due + 0.8 * (settings.supervise_interval - settings.grace)
        if now < stale_after and session.count(monitor.lane) == 0:
            return False
        # Something is in the lane, or the check is too late to trust a count:
        # only a supervise message of this tick or an older one proves death.
        tick = session.peek_tick(monitor.lane, self.accept)
        logger.info(
            'Monitor check of worker %s tick %d, %.1f s after it was due: its lane '
            'holds a supervise message of tick %s.',
            monitor.owner, monitor.tick, now - monitor.due, tick,
        )
        # TODO(require tick == monitor.tick, once the model checker shows a lane
        # never holds an older tick at a genuine check): a forged check with a
        # tick far ahead of the owner's takes over a live worker's jobs.
        return tick is not None and tick <= monitor.tick

    def _take_over(self, session: _Session, monitor: Monitor) -> None:
        reason = (
            f'worker {monitor.owner} left supervise tick {monitor.tick} unread '
            f'past its due time'
        )
        fence = Fence(
            owner=monitor.owner, by=self.worker_id, reason=reason, jobs=monitor.jobs,
        )
        # Kept in the store too, for an owner that comes back after the broker
        # dropped its control queue; before the notice, so that no re-dispatch
        # ever goes out without a fence that outlives the queue.
        self.store.keep_fence(monitor.owner, json.dumps(fence.to_body()))
        session.publish(fence.to_body(), monitor.control)
        session.keep_expiry(monitor.control)
        fault_point('check.after_fence')
        logger.warning(
            'Worker %s stopped reading its supervise lane (tick %d was due %.1f s '
            'ago); worker %s takes over its %d job(s) and re-dispatches each one '
            'that is not finished, cancelled or taken over already: %s.',
            monitor.owner, monitor.tick, time.time() - monitor.due, self.worker_id,
            len(monitor.jobs), ', '.join(f'{j} attempt {a}' for j, a in monitor.jobs),
        )
        lost = monitor.owner.rpartition('.')[0] or monitor.owner
        for job_id, attempt in monitor.jobs:
            self._redispatch(
                session, job_id, attempt, 'taken_over', reason,
                worker=lost, by=self.hostname,
            )
            # A takeover of many jobs must not make this worker's own tick
            # late, or its own jobs would be taken over in turn.
            self._tick_if_due(session)
        fault_point('check.after_redispatch')

    def _redispatch(
        self, session: _Session, job_id: str, attempt: int, event: str, reason: str,
        **detail: Any,
    ) -> None:
        """Publish ``job_id`` again as ``attempt + 1`` and record ``event``.

        ``detail`` goes into the history event; ``worker`` there names the
        worker that lost the job and ``by`` the one that re-dispatched it.
        """
        if self.store.superseded(job_id, attempt):
            logger.info(
                'Job %s attempt %d is already finished, cancelled or superseded; '
                'nothing to re-dispatch.', job_id, attempt,
            )
            return
        raw = self.store.message(job_id)
        if raw is None:
            logger.error(
                'Cannot re-dispatch job %s attempt %d: its message is no longer in '
                'the turnout store (turnout_record_ttl passed?). The job is lost.',
                job_id, attempt,
            )
            return
        try:
            stored = StoredMessage.loads(raw)
        except MalformedMessage as exc:
            logger.error(
                'Cannot re-dispatch job %s attempt %d: %s. The job is lost.',
                job_id, attempt, exc,
            )
            return
        headers = dict(stored.headers)
        headers.update({
            ATTEMPT_HEADER: attempt + 1, COPY_HEADER: uuid.uuid4().hex,
            REASON_HEADER: reason,
        })
        session.producer.publish(
            stored.body, exchange=stored.exchange, routing_key=stored.routing_key,
            headers=headers, content_type=stored.content_type,
            content_encoding=stored.content_encoding, **stored.properties,
        )
        self.store.log(
            job_id, self.event(event, attempt + 1, reason=reason, **detail),
        )
        logger.warning(
            'Re-dispatched job %s (%s) as attempt %d to %r: %s.',
            job_id, stored.task, attempt + 1, stored.routing_key, reason,
        )
        announce(self, 'taken_over', job_id, attempt + 1, stored.task,
                 worker=self.hostname, cause=event, reason=reason)

    def event(self, name: str, attempt: int, **detail: Any) -> dict[str, Any]:
        """A history event of a job, recorded by this worker."""
        event = {'event': name, 'attempt': attempt, 'worker': self.hostname,
                 'at': time.time()}
        event.update(detail)
        return event


_supervisors: weakref.WeakKeyDictionary[Celery, Supervisor] = (
    weakref.WeakKeyDictionary()
)


def supervisor_of(app: Celery) -> Supervisor | None:
    """The supervisor running for ``app`` in this worker process, if any."""
    return _supervisors.get(app)


def register(supervisor: Supervisor) -> None:
    """Make ``supervisor`` the one :func:`supervisor_of` returns for its app."""
    _supervisors[supervisor.app] = supervisor


def _acknowledge(jobs: Iterable[HeldJob]) -> None:
    for job in jobs:
        request = job.request
        # A requeued job's message is the broker's to deliver again.
        if (
            request is not None and not request.acknowledged
            and job.released != 'requeued'
        ):
            request.acknowledge()


def cold_shutdown_began() -> bool:
    """True once Celery's cold shutdown (SIGQUIT, a second Ctrl+C) began.

    Celery sets ``should_terminate`` when its soft shutdown is over, right
    before it stops the pool, and again when its signal handler returns.
    """
    flag = worker_state.should_terminate
    return flag is not None and flag is not False
