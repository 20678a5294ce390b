"""Progress reports are throttled, fenced by attempt, and watched for stalls."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from celery import Celery

from celery_turnout import signals
from celery_turnout.errors import ImproperlyConfigured, JobSuperseded
from celery_turnout.events import announce_now
from celery_turnout.ledger import HeldJob
from celery_turnout.progress import WRITE_PERIOD, ProgressWatch, Reporter
from celery_turnout.settings import Settings
from celery_turnout.store import FileStore
from celery_turnout.supervision import Supervisor
from celery_turnout.task import TurnoutTask


class FakeTask:
    """Stands in for a running task: records its state updates."""

    def __init__(self):
        self.request = SimpleNamespace(ignore_result=False, hostname='w1@host')
        self.states: list[tuple[str, dict]] = []

    def update_state(self, state, meta):
        self.states.append((state, meta))


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr('celery_turnout.progress.time.monotonic', lambda: self.now)


@pytest.fixture
def store(tmp_path):
    store = FileStore(str(tmp_path), 'test', ttl=60)
    store.admit('job-1', 1, 'copy-a', b'{}', 9, {'event': 'started'})
    return store


def test_a_hot_loop_of_reports_writes_once_per_period_and_flushes_the_last(
    store, monkeypatch,
):
    clock, task = Clock(monkeypatch), FakeTask()
    reporter = Reporter(task, store, 'job-1', 1)

    for done in range(1, 1001):
        reporter.report(done, 1000, 'rows')
    assert [meta['done'] for _, meta in task.states] == [1]
    assert store.progress('job-1')['done'] == 1

    clock.now += WRITE_PERIOD
    reporter.report(1001, 2000, None)
    assert task.states[-1] == ('PROGRESS', {
        'done': 1001, 'total': 2000, 'note': None, 'attempt': 1})

    reporter.report(1002, 2000, None)
    reporter.flush()
    assert store.progress('job-1')['done'] == 1002
    assert len(task.states) == 2, 'the flush at the end writes the store only'


def test_a_report_of_a_superseded_attempt_is_refused_and_stops_the_copy(store):
    task = FakeTask()
    store.admit('job-1', 2, 'takeover-copy', b'{}', 9, {'event': 'started'})
    reporter = Reporter(task, store, 'job-1', 1)

    with pytest.raises(JobSuperseded):
        reporter.report(5, 10, None)
    assert task.states == [], 'nothing reaches the result backend'
    assert store.progress('job-1') is None


def test_progress_moves_only_when_the_value_changes(store, monkeypatch):
    Clock(monkeypatch)
    reporter = Reporter(FakeTask(), store, 'job-1', 1)
    reporter.report(1, 10, None)
    moved = reporter.moved
    time.sleep(0.01)
    reporter.report(1, 10, None)
    assert reporter.moved == moved
    reporter.report(2, 10, None)
    assert reporter.moved > moved


def test_the_next_attempt_starts_from_the_last_saved_value(store):
    store.save_progress('job-1', 1, {'done': 7, 'total': 10, 'attempt': 1})
    store.admit('job-1', 2, 'takeover-copy', b'{}', 9, {'event': 'started'})
    reporter = Reporter(FakeTask(), store, 'job-1', 2, store.progress('job-1'))
    assert reporter.meta() == {'done': 7, 'total': 10, 'note': None, 'attempt': 2}


def test_a_progress_value_must_be_a_number(store):
    reporter = Reporter(FakeTask(), store, 'job-1', 1)
    with pytest.raises(TypeError):
        reporter.report('half', None, None)
    with pytest.raises(TypeError):
        reporter.report(1, True, None)


def test_an_unreachable_store_does_not_fail_the_job(store, monkeypatch, caplog):
    def down(*args):
        raise ConnectionError('store down')

    monkeypatch.setattr(store, 'save_progress', down)
    reporter = Reporter(FakeTask(), store, 'job-1', 1)
    reporter.report(1, 2, None)
    reporter.flush()
    assert 'unreachable' in caplog.text
    assert reporter.dirty


def test_each_flushed_value_is_signalled_in_the_pool_process(store):
    seen = []

    def receiver(sender, **kwargs):
        seen.append(kwargs)

    signals.job_progress.connect(receiver)
    try:
        Reporter(FakeTask(), store, 'job-1', 1).report(3, 4, 'x')
    finally:
        signals.job_progress.disconnect(receiver)
    assert seen == [{'signal': signals.job_progress, 'job_id': 'job-1',
                     'attempt': 1, 'done': 3, 'total': 4, 'note': 'x'}]


# The owner's side.

app = Celery('unit-progress', broker='memory://', backend='cache+memory://')
app.conf.turnout_store_url = 'file:///unused'


@app.task(base=TurnoutTask, name='unit.report', stall_timeout=5)
def reporting_job():
    """A job that only reports its stalls."""


@app.task(base=TurnoutTask, name='unit.restart', stall_timeout=5, on_stall='restart')
def restarting_job():
    """A job that runs again when it stalls."""


@app.task(base=TurnoutTask, name='unit.fail', stall_timeout=5, on_stall='fail')
def failing_job():
    """A job that fails when it stalls."""


@app.task(base=TurnoutTask, name='unit.quiet')
def quiet_job():
    """A job without a stall timeout."""


@pytest.fixture
def supervisor(store):
    app.backend.client.cache.clear()
    supervisor = Supervisor(app, 'w1@host', Settings.from_app(app), store)
    supervisor.redispatched = []
    supervisor.progress_watch = ProgressWatch(
        supervisor, lambda *args: supervisor.redispatched.append(args[1:]),
    )
    return supervisor


def hold(supervisor, task, started_ago):
    job = HeldJob('job-1', task, 1, 'copy-a')
    job.started = time.time() - started_ago
    supervisor.ledger.add(job)
    return job


def test_the_owner_learns_progress_and_announces_each_change_once(supervisor, store):
    job = hold(supervisor, 'unit.report', 1)
    store.save_progress('job-1', 1, {'done': 1, 'total': 4, 'attempt': 1,
                                     'moved': time.time()})
    announced = []
    signals.job_progress.connect(lambda sender, **kw: announced.append(kw['done']),
                                 weak=False)
    try:
        supervisor.progress_watch.poll(None)
        supervisor.progress_watch.poll(None)
        supervisor.run_pending_calls()
    finally:
        signals.job_progress.receivers.clear()
    assert job.progress['done'] == 1
    assert announced == [1]
    assert job.describe('w1@host', None)['progress']['total'] == 4


def test_a_stall_is_reported_once_and_the_job_keeps_running(supervisor, caplog):
    job = hold(supervisor, 'unit.report', 6)
    supervisor.progress_watch.poll(None)
    supervisor.progress_watch.poll(None)
    warnings = [r for r in caplog.records if 'no progress' in r.getMessage()]
    assert len(warnings) == 1
    assert 'job-1' in warnings[0].getMessage() and 'w1@host' in warnings[0].getMessage()
    assert job.released is None
    assert [e['event'] for e in supervisor.store.history('job-1')][-1] == 'stalled'


def test_a_job_that_moved_recently_is_not_stalled(supervisor, store):
    job = hold(supervisor, 'unit.report', 60)
    store.save_progress('job-1', 1, {'done': 2, 'attempt': 1,
                                     'moved': time.time() - 1})
    supervisor.progress_watch.poll(None)
    assert job.stall_reported is None


def test_a_stalled_job_with_on_stall_restart_runs_again_as_its_next_attempt(
    supervisor,
):
    job = hold(supervisor, 'unit.restart', 6)
    supervisor.progress_watch.poll(None)
    assert job.released == 'stalled'
    (redispatched,) = supervisor.redispatched
    assert redispatched[:3] == ('job-1', 1, 'restarted')


def test_a_stalled_job_with_on_stall_fail_ends_failure_and_is_fenced(
    supervisor, store,
):
    job = hold(supervisor, 'unit.fail', 6)
    supervisor.progress_watch.poll(None)
    supervisor.run_pending_calls()
    assert job.released == 'stalled'
    assert store.superseded('job-1', 1)
    result = app.AsyncResult('job-1')
    assert result.state == 'FAILURE'
    assert type(result.result).__name__ == 'JobStalled'


def test_a_bad_on_stall_option_is_refused_when_the_task_is_bound():
    other = Celery('unit-bad', broker='memory://', set_as_current=False)

    # Not shared: a shared task would be bound again to every later app.
    @other.task(base=TurnoutTask, name='unit.bad', on_stall='panic', shared=False)
    def bad():
        """Never bound."""

    with pytest.raises(ImproperlyConfigured, match='on_stall'):
        other.finalize()


def test_events_go_out_only_through_an_enabled_dispatcher(supervisor):
    sent = []
    supervisor.event_dispatcher = SimpleNamespace(
        enabled=False, send=lambda kind, **fields: sent.append((kind, fields)),
    )
    announce_now(supervisor, 'fenced', 'job-1', 1, 'unit.report', by='w2')
    assert sent == []
    supervisor.event_dispatcher.enabled = True
    announce_now(supervisor, 'fenced', 'job-1', 1, 'unit.report', by='w2')
    assert sent == [('turnout-job-fenced', {
        'uuid': 'job-1', 'attempt': 1, 'task': 'unit.report', 'by': 'w2'})]


def test_a_worker_sending_only_heartbeats_sends_no_job_events(supervisor):
    sent = []
    supervisor.event_dispatcher = SimpleNamespace(
        enabled=True, groups=['worker'],
        send=lambda kind, **fields: sent.append(kind),
    )
    announce_now(supervisor, 'fenced', 'job-1', 1, 'unit.report', by='w2')
    assert sent == []


def test_ticks_read_the_progress_of_jobs_without_a_stall_timeout_only_for_events(
    supervisor, store,
):
    job = hold(supervisor, 'unit.quiet', 1)
    store.save_progress('job-1', 1, {'done': 1, 'attempt': 1, 'moved': time.time()})
    supervisor.event_dispatcher = SimpleNamespace(
        enabled=True, groups=['worker'], send=lambda kind, **fields: None,
    )
    supervisor.progress_watch.poll(None)
    assert job.progress is None, 'a heartbeat-only worker read the progress'

    supervisor.event_dispatcher.groups = None  # started with -E
    supervisor.progress_watch.poll(None)
    assert job.progress is not None and job.progress['done'] == 1
