"""The owner's tick and the checker's decision, step by step, on a recording broker.

The order of the steps is what keeps a job from being lost: the evidence of the
owner's death must exist before the previous evidence is purged and before the
job's own message is acknowledged.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.worker import state as worker_state
from kombu import Queue

from celery_turnout.errors import MalformedMessage
from celery_turnout.intake import _make_way
from celery_turnout.ledger import HeldJob
from celery_turnout.messages import ATTEMPT_HEADER, COPY_HEADER, Fence, Monitor
from celery_turnout.settings import Settings
from celery_turnout.store import FileStore
from celery_turnout.supervision import (
    Supervisor,
    _supervise_tick,
    cold_shutdown_began,
)


class RecordingSession:
    """Stands in for a broker connection and writes down every operation."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.ops: list[tuple] = []
        self.lanes = tuple(Queue(name) for name in supervisor.names.lanes)
        self.control = Queue(supervisor.names.control)
        self.monitor = Queue(supervisor.names.monitor)
        self.declared_at = time.monotonic()
        self.control_inbox: list = []
        self.counts: dict[str, int] = {}
        self.lane_ticks: dict[str, int | None] = {}
        self.producer = SimpleNamespace(publish=self._publish_raw)

    def publish(self, body, queue_name):
        self.ops.append(('publish', body['kind'], queue_name))

    def purge(self, lane):
        self.ops.append(('purge', lane.name))

    def next_control_message(self, accept):
        self.ops.append(('read control',))
        return self.control_inbox.pop(0) if self.control_inbox else None

    def count(self, queue_name):
        self.ops.append(('count', queue_name))
        return self.counts.get(queue_name, 0)

    def peek_tick(self, queue_name, accept):
        self.ops.append(('peek', queue_name))
        return self.lane_ticks.get(queue_name)

    def declare(self, monitor):
        self.ops.append(('declare',))

    def keep_expiry(self, queue_name):
        self.ops.append(('keep expiry', queue_name))

    def _publish_raw(self, body, **options):
        self.ops.append(('re-dispatch', options['headers']['id'],
                         options['headers'][ATTEMPT_HEADER]))


class FakeMessage:
    def __init__(self, body):
        self.body = body
        self.acked = False

    def decode(self):
        return self.body

    def ack(self):
        self.acked = True


class FakeRequest:
    def __init__(self):
        self.acknowledged = False

    def acknowledge(self):
        self.acknowledged = True


@pytest.fixture
def store(tmp_path):
    return FileStore(str(tmp_path), 'test', ttl=60)


@pytest.fixture
def supervisor(store):
    app = Celery('unit', broker='memory://')
    app.conf.turnout_store_url = 'file:///unused'
    app.conf.turnout_queue_prefix = 'test'
    settings = Settings.from_app(app)
    return Supervisor(app, 'w1@host', settings, store)


@pytest.fixture
def session(supervisor):
    return RecordingSession(supervisor)


def stored_message(job_id):
    return json.dumps({
        'task': 'app.audit', 'exchange': 'celery', 'routing_key': 'celery',
        'headers': {'id': job_id, COPY_HEADER: f'copy-{job_id}'}, 'properties': {},
        'body': '', 'content_type': 'application/json', 'content_encoding': 'utf-8',
    }).encode()


def hold(supervisor, store, job_id='job-1', attempt=1):
    store.admit(
        job_id, attempt, f'copy-{job_id}', stored_message(job_id), 9,
        {'event': 'started'},
    )
    job = HeldJob(job_id, 'app.audit', attempt, f'copy-{job_id}')
    job.request = FakeRequest()
    supervisor.ledger.add(job)
    return job


def a_fence(supervisor, *jobs):
    return Fence(owner=supervisor.worker_id, by='w2', reason='late', jobs=jobs)


def steps(session):
    return [op[0] if op[0] != 'publish' else f'publish {op[1]}' for op in session.ops]


def test_a_tick_plants_new_evidence_before_it_removes_the_old_then_acknowledges(
    supervisor, store, session,
):
    job = hold(supervisor, store)

    supervisor._tick(session)
    assert steps(session) == [
        'read control', 'publish supervise', 'purge',
    ], 'on brokers without a monitor queue the check goes to the store board'
    assert session.ops[1][2] == supervisor.names.lanes[0]
    assert session.ops[2][1] == supervisor.names.lanes[1]
    assert not job.request.acknowledged, 'acknowledged on the main thread, later'

    supervisor.run_pending_calls()
    assert job.request.acknowledged and job.covered
    checks, _ = store.claim_checks(time.time() + 60, 1, 10)
    (token, body), = checks
    monitor = Monitor.from_body(json.loads(body))
    assert monitor.jobs == (('job-1', 1),)
    assert monitor.lane == supervisor.names.lanes[0]


def test_on_rabbitmq_the_monitor_message_goes_out_after_the_supervise_message(
    supervisor, store, session,
):
    supervisor._board = None
    hold(supervisor, store)
    supervisor._tick(session)
    assert steps(session) == [
        'read control', 'publish supervise', 'publish monitor', 'purge']


def test_consecutive_ticks_alternate_lanes_and_purge_the_previous_one(
    supervisor, store, session,
):
    hold(supervisor, store)
    supervisor._tick(session)
    supervisor._tick(session)
    published = [op[2] for op in session.ops if op[:2] == ('publish', 'supervise')]
    purged = [op[1] for op in session.ops if op[0] == 'purge']
    assert published == list(supervisor.names.lanes)
    assert purged == [supervisor.names.lanes[1], supervisor.names.lanes[0]]


def test_an_idle_owner_purges_its_last_lane_once_and_then_sends_nothing(
    supervisor, store, session,
):
    job = hold(supervisor, store)
    supervisor._tick(session)
    supervisor.ledger.discard(job)
    session.ops.clear()

    supervisor._tick(session)
    supervisor._tick(session)
    assert steps(session) == ['read control', 'purge', 'read control']
    assert session.ops[1][1] == supervisor.names.lanes[0]


def test_a_job_covered_once_is_not_acknowledged_again(supervisor, store, session):
    job = hold(supervisor, store)
    supervisor._tick(session)
    supervisor.run_pending_calls()
    job.request.acknowledged = False
    supervisor._tick(session)
    supervisor.run_pending_calls()
    assert not job.request.acknowledged


def test_a_fence_notice_is_obeyed_before_the_tick_names_the_job_again(
    supervisor, store, session,
):
    job = hold(supervisor, store)
    other = hold(supervisor, store, 'job-2')
    fence = a_fence(supervisor, ('job-1', 1))
    notice = FakeMessage(fence.to_body())
    session.control_inbox.append(notice)

    supervisor._tick(session)
    assert notice.acked
    assert job.released == 'fenced' and other.released is None
    # In case the checker died between its notice and its re-dispatch, the
    # fenced owner re-dispatches the job itself, before it ticks on.
    assert steps(session)[:3] == ['read control', 're-dispatch', 'read control']
    assert session.ops[1] == ('re-dispatch', 'job-1', 2)
    (_, body), = store.claim_checks(time.time() + 60, 1, 9)[0]
    monitor = Monitor.from_body(json.loads(body))
    assert monitor.jobs == (('job-2', 1),)


def test_a_fence_for_an_older_attempt_leaves_a_newer_one_alone(
    supervisor, store, session,
):
    job = hold(supervisor, store, attempt=3)
    fence = a_fence(supervisor, ('job-1', 2))
    session.control_inbox.append(FakeMessage(fence.to_body()))
    supervisor._tick(session)
    assert job.released is None


def test_a_malformed_control_message_is_dropped_and_the_tick_goes_on(
    supervisor, store, session,
):
    hold(supervisor, store)
    junk = FakeMessage({'kind': 'fence', 'jobs': 'all'})
    session.control_inbox.append(junk)
    supervisor._tick(session)
    assert junk.acked
    assert 'publish supervise' in steps(session)


def a_monitor_for(supervisor, lane_index=0, due=None, tick=0):
    return Monitor(
        owner='w9@host.dead', lane=f'test.supervise.w9.{lane_index}',
        control='test.control.w9', tick=tick,
        due=time.time() if due is None else due, jobs=(('job-1', 1),),
    )


def test_an_unread_supervise_message_means_takeover_fence_first(
    supervisor, store, session,
):
    store.admit('job-1', 1, 'copy-a', stored_message('job-1'), 9, {'event': 'started'})
    monitor = a_monitor_for(supervisor)
    session.counts[monitor.lane] = 1
    session.lane_ticks[monitor.lane] = monitor.tick

    assert supervisor._owner_is_gone(session, monitor, monitor.due)
    supervisor._take_over(session, monitor)
    assert session.ops[2:] == [
        ('publish', 'fence', 'test.control.w9'),
        ('keep expiry', 'test.control.w9'),
        ('re-dispatch', 'job-1', 2),
    ]
    assert store.history('job-1')[-1]['event'] == 'taken_over'


def test_a_lane_holding_anything_but_an_unread_tick_proves_nothing(
    supervisor, session,
):
    monitor = a_monitor_for(supervisor, tick=4)
    session.counts[monitor.lane] = 1
    session.lane_ticks[monitor.lane] = None  # only foreign messages
    assert not supervisor._owner_is_gone(session, monitor, monitor.due)
    session.lane_ticks[monitor.lane] = 6
    assert not supervisor._owner_is_gone(session, monitor, monitor.due)


def test_a_tick_that_runs_late_keeps_the_check_due_time_of_its_slot(
    supervisor, store, session,
):
    hold(supervisor, store)
    interval = supervisor.settings.supervise_interval
    supervisor._origin -= 0.4 * interval  # this tick runs 0.4 intervals late
    supervisor._tick(session)
    (_, body), = store.claim_checks(time.time() + 60, 1, 9)[0]
    due = Monitor.from_body(json.loads(body)).due
    slot = time.time() - 0.4 * interval
    assert due == pytest.approx(slot + supervisor.settings.detection_bound, abs=0.05)


def test_a_check_naming_queues_outside_the_prefix_is_malformed(supervisor):
    body = a_monitor_for(supervisor).to_body()
    assert supervisor._parse_monitor(body).lane == body['lane']
    with pytest.raises(MalformedMessage, match='not turnout queues'):
        supervisor._parse_monitor({**body, 'control': 'celery'})


def test_an_empty_lane_at_the_due_time_means_the_owner_is_alive(supervisor, session):
    monitor = a_monitor_for(supervisor)
    assert not supervisor._owner_is_gone(session, monitor, monitor.due)


def test_a_late_check_reads_which_tick_the_lane_holds(supervisor, session):
    interval = supervisor.settings.supervise_interval
    monitor = a_monitor_for(supervisor, tick=7)
    late = monitor.due + interval

    session.lane_ticks[monitor.lane] = 9
    assert not supervisor._owner_is_gone(session, monitor, late)
    session.lane_ticks[monitor.lane] = 7
    assert supervisor._owner_is_gone(session, monitor, late)
    assert ('count', monitor.lane) not in session.ops


def test_a_job_already_finished_is_not_re_dispatched(supervisor, store, session):
    store.admit('job-1', 1, 'copy-a', b'{}', 9, {'event': 'started'})
    store.finish('job-1', 1, 'w9')
    supervisor._take_over(session, a_monitor_for(supervisor))
    assert [op[0] for op in session.ops] == ['publish', 'keep expiry']


def test_checks_wait_one_detection_bound_after_a_reconnection(
    supervisor, store, session,
):
    monitor = a_monitor_for(supervisor, due=time.time() - 1)
    store.post_check(monitor.due, json.dumps(monitor.to_body()))
    session.counts[monitor.lane] = 1
    supervisor._checks_from = time.time() + 60
    supervisor._check_due(session)
    assert session.ops == []


def own_check_of_first_tick(supervisor, store, session, late):
    """Tick once, then post that tick's check as due ``late`` seconds ago."""
    supervisor._tick(session)
    (_, body), = store.claim_checks(time.time() + 60, 0, 10)[0]
    own = Monitor.from_body(json.loads(body))
    for token, _ in store.claim_checks(time.time() + 60, 0, 10)[0]:
        store.complete_check(token)
    own = Monitor(own.owner, own.lane, own.control, own.tick, time.time() - late,
                  own.jobs)
    store.post_check(own.due, json.dumps(own.to_body()))
    # The lane still holds the tick's supervise message, as it would for a
    # dead owner.
    session.counts[own.lane] = 1
    session.lane_ticks[own.lane] = own.tick
    supervisor._checks_from = supervisor._next_board_poll = 0.0
    return own


def test_a_worker_never_takes_over_its_own_jobs_once_a_later_tick_is_out(
    supervisor, store, session,
):
    hold(supervisor, store)
    own = own_check_of_first_tick(supervisor, store, session, late=0.0)
    supervisor._tick(session)
    session.ops.clear()

    supervisor._check_due(session)
    assert not [op for op in session.ops if op[:2] == ('publish', 'fence')]
    left = [Monitor.from_body(json.loads(body)).tick
            for _, body in store.claim_checks(time.time() + 60, 0, 10)[0]]
    assert left == [1], 'the check of tick 0 goes, the next tick\'s stays'
    assert supervisor.ledger.get('job-1').released is None
    assert own.owner == supervisor.worker_id


@pytest.mark.parametrize(
    ('late', 'next_tick_in', 'logged'),
    [
        # Its supervision thread was held up past its next tick.
        (3.0, -2.0, 'checked its own supervise tick 0 3.0 s after it was due'),
        # Its wall clock, which due times use, stepped ahead of the cadence.
        (0.0, 60.0, 'before its next tick was due'),
    ],
    ids=['held-up', 'clock-ahead'],
)
def test_a_worker_ticks_before_it_lets_a_check_of_its_own_tick_go(
    supervisor, store, session, caplog, late, next_tick_in, logged,
):
    hold(supervisor, store)
    own_check_of_first_tick(supervisor, store, session, late=late)
    supervisor._next_tick = time.monotonic() + next_tick_in
    session.ops.clear()

    with caplog.at_level('WARNING'):
        supervisor._check_due(session)
    assert steps(session)[:3] == ['read control', 'publish supervise', 'purge']
    assert 'publish fence' not in steps(session)
    assert supervisor.ledger.get('job-1').released is None
    assert logged in caplog.text


def test_a_cold_shutdown_re_dispatches_then_purges_and_only_then_acknowledges(
    supervisor, store, session,
):
    running = hold(supervisor, store)
    running.request.acknowledged = True
    waiting = hold(supervisor, store, 'job-2')  # not yet covered

    supervisor._hand_off_cold(session)
    assert running.released == waiting.released == 'handed_off'
    assert session.ops[:2] == [('re-dispatch', 'job-1', 2), ('re-dispatch', 'job-2', 2)]
    assert steps(session)[2:] == ['purge', 'purge']
    # The waiting job's message goes on the main thread, after its re-dispatch.
    assert not waiting.request.acknowledged
    supervisor.run_pending_calls()
    assert waiting.request.acknowledged
    assert supervisor._stopping.is_set()


def test_a_cold_shutdown_without_a_broker_leaves_the_evidence_to_peers(
    supervisor, store,
):
    job = hold(supervisor, store)
    supervisor._hand_off_cold(None)
    supervisor.run_pending_calls()
    assert job.released == 'handed_off'
    assert not job.request.acknowledged
    assert supervisor._stopping.is_set()


def test_a_copy_celery_stops_unacknowledged_is_left_to_the_broker(
    supervisor, store, session,
):
    supervisor._driver = 'redis'
    job = hold(supervisor, store)
    # A tick covers the job while Celery's soft shutdown holds the main thread;
    # then Celery stops the copy, whose message it leaves to the broker.
    supervisor._tick(session)
    supervisor.copy_cancelled(job)
    supervisor.run_pending_calls()
    assert job.released == 'requeued'
    assert not job.request.acknowledged

    session.ops.clear()
    supervisor._hand_off_cold(session)
    assert steps(session) == ['purge', 'purge']


def test_a_copy_celery_stops_is_re_dispatched_where_the_broker_would_not(
    supervisor, store, session,
):
    supervisor._driver = 'filesystem'
    job = hold(supervisor, store)
    supervisor.copy_cancelled(job)
    assert job.released == 'handed_off'
    supervisor._hand_off_cold(session)
    assert session.ops == [
        ('re-dispatch', 'job-1', 2),
        ('purge', supervisor.names.lanes[0]),
        ('purge', supervisor.names.lanes[1]),
    ]


@pytest.mark.parametrize(
    ('flag', 'began'), [(None, False), (False, False), (True, True), (1, True)],
)
def test_a_cold_shutdown_is_read_as_celery_reads_it(monkeypatch, flag, began):
    monkeypatch.setattr(worker_state, 'should_terminate', flag)
    assert cold_shutdown_began() is began


def test_a_warm_hand_off_acknowledges_an_uncovered_job_only_after_its_re_dispatch(
    supervisor, store, session,
):
    job = hold(supervisor, store)
    acknowledged_at_redispatch = []

    def supervision_thread():
        command = supervisor._commands.get(timeout=5)
        acknowledged_at_redispatch.append(job.request.acknowledged)
        command(session)

    thread = threading.Thread(target=supervision_thread)
    thread.start()
    supervisor.hand_off(timeout=5)
    thread.join(5)
    assert acknowledged_at_redispatch == [False]
    assert ('re-dispatch', 'job-1', 2) in session.ops
    assert job.request.acknowledged


def test_a_hand_off_that_times_out_leaves_an_uncovered_job_to_the_broker(
    supervisor, store,
):
    job = hold(supervisor, store)
    supervisor.hand_off(timeout=0.05)  # no supervision thread takes the command
    supervisor.run_pending_calls()
    assert job.released == 'requeued'
    assert not job.request.acknowledged


def test_a_lost_connection_re_dispatches_the_acknowledged_jobs_no_process_took(
    supervisor, store, session,
):
    # Celery drops every job that waits for a pool process, its ETA or its
    # rate limit when its connection goes, counting on the broker.
    running = hold(supervisor, store, 'running')
    running.request.acknowledged, running.started = True, 1.0
    waiting = hold(supervisor, store, 'waiting')
    waiting.request.acknowledged = True
    uncovered = hold(supervisor, store, 'uncovered')

    supervisor.redispatch_unstarted()
    supervisor._prune_finished(session)

    assert [op for op in session.ops if op[0] == 're-dispatch'] == [
        ('re-dispatch', 'waiting', 2),
    ]
    assert waiting.released == 'handed_off'
    assert supervisor.ledger.get('waiting') is None
    # The running job goes on; the uncovered one is the broker's to deliver.
    assert running.released is None and uncovered.released is None


def test_a_job_revoked_while_it_waited_is_let_go_without_a_re_dispatch(
    supervisor, store, session,
):
    waiting = hold(supervisor, store, 'revoked-waiting')
    waiting.request.acknowledged, waiting.seen = True, True
    worker_state.revoked.add('revoked-waiting')
    try:
        supervisor._prune_finished(session)
    finally:
        worker_state.revoked.discard('revoked-waiting')

    assert not [op for op in session.ops if op[0] == 're-dispatch']
    assert supervisor.ledger.get('revoked-waiting') is None


def test_a_monitor_message_due_far_ahead_is_dropped_and_holds_no_slot(supervisor):
    # Settings: interval 5 s, grace 2.5 s, detection bound 7.5 s.
    soon = FakeMessage(a_monitor_for(supervisor, due=time.time() + 7).to_body())
    later = FakeMessage(a_monitor_for(supervisor, due=time.time() + 86_400).to_body())

    supervisor._on_monitor(soon.body, soon)
    supervisor._on_monitor(later.body, later)

    assert [p.message for p in supervisor._pending] == [soon]
    assert later.acked and not soon.acked


def older_copy(supervisor, store, retries=0):
    job = hold(supervisor, store, 'job-7')
    job.request = SimpleNamespace(request_dict={'retries': retries})
    return job


def test_a_next_attempt_arriving_where_the_older_copy_runs_fences_that_copy(
    supervisor, store,
):
    older = older_copy(supervisor, store)
    _make_way(supervisor, older, {'id': 'job-7', 'retries': 0}, 2)
    assert older.released == 'fenced'


def test_the_retry_an_attempt_asked_for_does_not_fence_it(supervisor, store):
    older = older_copy(supervisor, store, retries=1)
    _make_way(supervisor, older, {'id': 'job-7', 'retries': 2}, 3)
    assert older.released is None
    assert 'fenced' not in [e['event'] for e in store.history('job-7')]


def test_the_re_dispatch_of_a_job_whose_pool_process_died_does_not_fence_it(
    supervisor, store,
):
    older = older_copy(supervisor, store)
    older.child_lost = True
    _make_way(supervisor, older, {'id': 'job-7', 'retries': 0}, 2)
    assert older.released is None


def test_a_takeover_keeps_its_fence_in_the_store_before_it_sends_the_notice(
    supervisor, store, session, monkeypatch,
):
    store.admit('job-1', 1, 'copy-a', stored_message('job-1'), 9, {'event': 'started'})
    keep = store.keep_fence
    monkeypatch.setattr(store, 'keep_fence', lambda owner, body: (
        session.ops.append(('keep fence', owner)), keep(owner, body)))
    monitor = a_monitor_for(supervisor)

    supervisor._take_over(session, monitor)

    assert steps(session) == ['keep fence', 'publish fence', 'keep expiry',
                              're-dispatch']
    (kept,) = store.kept_fences(monitor.owner)
    assert Fence.from_body(json.loads(kept)).jobs == (('job-1', 1),)


def silent_for(supervisor, seconds, clock='both'):
    """Make the last read of the control queue ``seconds`` old on one or both
    clocks (a suspended host stops the monotonic one)."""
    monotonic = time.monotonic() - (seconds if clock != 'wall' else 0)
    wall = time.time() - (seconds if clock != 'monotonic' else 0)
    supervisor._fences_read_at = (monotonic, wall)


@pytest.mark.parametrize('clock', ['both', 'monotonic', 'wall'])
def test_an_owner_back_after_its_control_queue_may_have_expired_obeys_kept_fences(
    supervisor, store, session, clock,
):
    job = hold(supervisor, store)
    other = hold(supervisor, store, 'job-2')
    supervisor._tick(session)
    for token, _ in store.claim_checks(time.time() + 60, 1, 9)[0]:
        store.complete_check(token)
    store.keep_fence(supervisor.worker_id,
                     json.dumps(a_fence(supervisor, ('job-1', 1)).to_body()))
    store.keep_fence(supervisor.worker_id, '{"kind": "fence", "jobs": "all"}')
    silent_for(supervisor, supervisor.settings.queue_expires, clock)
    session.ops.clear()

    supervisor._tick(session)

    assert job.released == 'fenced' and other.released is None
    # The notice is gone with the queue, so the checker may have died before
    # its re-dispatch as well: the owner re-dispatches the job itself.
    assert ('re-dispatch', 'job-1', 2) in session.ops
    (_, body), = store.claim_checks(time.time() + 60, 1, 9)[0]
    assert Monitor.from_body(json.loads(body)).jobs == (('job-2', 1),)


def test_an_owner_that_kept_reading_its_control_queue_leaves_the_store_alone(
    supervisor, store, session,
):
    job = hold(supervisor, store)
    supervisor._tick(session)
    store.keep_fence(supervisor.worker_id,
                     json.dumps(a_fence(supervisor, ('job-1', 1)).to_body()))
    silent_for(supervisor, supervisor.settings.queue_expires / 4)

    supervisor._tick(session)

    # A notice still in the queue is read there; the store's copy is only for
    # a queue the broker may have dropped.
    assert job.released is None


@pytest.mark.parametrize('body, tick', [
    ({'kind': 'supervise', 'owner': 'w1@host.abc', 'tick': 7}, 7),
    ({'kind': 'supervise', 'owner': 'w1@host.abc', 'tick': 0}, 0),
    ({'kind': 'supervise', 'owner': 'w1@host.abc', 'tick': -5}, None),
    ({'kind': 'supervise', 'owner': 'w1@host.abc', 'tick': True}, None),
    ({'kind': 'supervise', 'owner': 'w1@host.abc', 'tick': '7'}, None),
    ({'kind': 'fence', 'tick': 7}, None),
    ('supervise 7', None),
])
def test_only_a_supervise_message_with_a_tick_counted_from_zero_is_read(body, tick):
    assert _supervise_tick(FakeMessage(body)) == tick
