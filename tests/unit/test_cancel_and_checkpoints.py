"""Cancels are durable, revokes become cancels, checkpoints reach the next attempt."""

from __future__ import annotations

import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_revoked

import celery_turnout
from celery_turnout import supervision
from celery_turnout.errors import JobSuperseded
from celery_turnout.intake import _fail_exhausted
from celery_turnout.ledger import HeldJob
from celery_turnout.progress import Reporter
from celery_turnout.settings import Settings
from celery_turnout.store import store_for
from celery_turnout.supervision import Supervisor, register
from celery_turnout.task import MAX_CHECKPOINT_BYTES, TurnoutTask

APP = Celery('unit-cancel', broker='memory://', backend='cache+memory://',
             set_as_current=False)
APP.conf.turnout_store_url = f'file://{tempfile.mkdtemp(prefix="turnout-unit-")}'
SEEN: list = []


@APP.task(base=TurnoutTask, bind=True, name='unit.resumable')
def resumable(self, steps):
    """Count to ``steps``, checkpointing each step, resuming where it was."""
    SEEN.append((self.attempt, self.resume_state))
    start = (self.resume_state or {}).get('next', 0)
    for step in range(start, steps):
        self.progress(step + 1, steps)
        self.checkpoint({'next': step + 1})
    return start


@APP.task(base=TurnoutTask, bind=True, name='unit.overtaken')
def overtaken(self):
    """Get taken over by attempt 2 while running, then try to checkpoint."""
    SEEN.append((self.attempt, self.resume_state))
    claim(APP, 2)
    self.checkpoint({'next': 1})
    return 'done'


@pytest.fixture
def app():
    SEEN.clear()
    yield APP
    for job in os.listdir(store_for(APP).root):
        shutil.rmtree(os.path.join(store_for(APP).root, job))
    APP.backend.client.cache.clear()
    supervision._supervisors.pop(APP, None)


def run_as(app, attempt, steps=3, name='unit.resumable'):
    """Run the job in this process as a pool process would run ``attempt``."""
    task = app.tasks[name]
    task.push_request(id='job-1', turnout_attempt=attempt, hostname='w1@host',
                      called_directly=False, ignore_result=False)
    try:
        return task(steps) if name == 'unit.resumable' else task()
    finally:
        task.pop_request()


def claim(app, attempt):
    store_for(app).admit('job-1', attempt, f'copy-{attempt}', b'{}', 9,
                         {'event': 'started'})


def test_cancel_marks_the_job_for_good_and_stores_revoked_with_the_reason(app):
    assert celery_turnout.cancel(app, 'job-1', 'the operator said so')

    assert celery_turnout.cancelled(app, 'job-1') == 'the operator said so'
    result = app.AsyncResult('job-1')
    assert result.state == 'REVOKED'
    assert str(result.result) == 'the operator said so'
    (event,) = celery_turnout.history(app, 'job-1')
    assert event['event'] == 'cancelled' and event['reason'] == 'the operator said so'
    claim(app, 2)
    admission = store_for(app).admit('job-1', 2, 'takeover', b'{}', 9, {})
    assert admission.verdict.value == 'cancelled'


def test_cancelling_a_finished_job_leaves_its_outcome_alone(app):
    app.backend.mark_as_done('job-1', 42)
    assert not celery_turnout.cancel(app, 'job-1', 'too late')
    assert app.AsyncResult('job-1').get() == 42


def test_a_revoke_that_stops_a_copy_becomes_a_durable_cancel(app, tmp_path):
    store = store_for(app)
    supervisor = Supervisor(app, 'w1@host', Settings.from_app(app), store)
    register(supervisor)
    job = HeldJob('job-1', 'unit.resumable', 2, 'copy-2')
    job.started = 1.0
    supervisor.ledger.add(job)

    task_revoked.send(
        sender=app.tasks['unit.resumable'],
        request=SimpleNamespace(id='job-1', turnout_attempt=2),
        terminated=True, signum=9, expired=False,
    )

    assert job.released == 'cancelled', 'its end is not a lost pool process'
    assert store.cancelled('job-1') == 'revoked'
    assert store.superseded('job-1', 2)
    assert celery_turnout.history(app, 'job-1')[-1]['event'] == 'revoked'


def test_the_next_attempt_resumes_from_the_last_checkpoint(app):
    claim(app, 1)
    assert run_as(app, 1) == 0
    checkpoint = celery_turnout.checkpoint_of(app, 'job-1')
    assert (checkpoint['state'], checkpoint['attempt']) == ({'next': 3}, 1)

    claim(app, 2)
    assert run_as(app, 2, steps=5) == 3
    assert SEEN == [(1, None), (2, {'next': 3})]
    assert celery_turnout.progress_of(app, 'job-1')['done'] == 5


def test_a_copy_superseded_while_it_runs_cannot_checkpoint_and_its_outcome_is_dropped(
    app,
):
    claim(app, 1)
    with pytest.raises(Ignore):
        run_as(app, 1, name='unit.overtaken')
    assert SEEN == [(1, None)]
    assert celery_turnout.checkpoint_of(app, 'job-1') is None


@pytest.mark.parametrize('attempt', [1, 2])
def test_a_copy_superseded_before_a_pool_process_took_it_runs_no_user_code(
    app, attempt,
):
    for claimed in range(1, attempt + 2):
        claim(app, claimed)
    with pytest.raises(Ignore):
        run_as(app, attempt)
    assert SEEN == []


def test_a_checkpoint_must_be_small_json(app):
    task = app.tasks['unit.resumable']
    with pytest.raises(TypeError):
        task.checkpoint({'when': object()})
    with pytest.raises(ValueError):
        task.checkpoint('x' * MAX_CHECKPOINT_BYTES)


def test_outside_a_worker_progress_and_checkpoints_do_nothing(app):
    task = app.tasks['unit.resumable']
    assert task(2) == 0
    assert celery_turnout.progress_of(app, 'job-1') is None
    assert task.resume_state is None


def test_job_superseded_is_what_a_refused_checkpoint_raises(app):
    claim(app, 1)
    claim(app, 2)
    task = app.tasks['unit.resumable']
    task.push_request(id='job-1', turnout_attempt=1, hostname='w1@host',
                      called_directly=False, ignore_result=False,
                      turnout_progress=Reporter(task, store_for(app), 'job-1', 1))
    try:
        with pytest.raises(JobSuperseded):
            task.checkpoint({'next': 1})
    finally:
        task.pop_request()


def test_an_exhausted_job_fences_its_last_attempt(app):
    store = store_for(app)
    supervisor = Supervisor(app, 'w2@host', Settings.from_app(app), store)
    claim(app, 1)
    claim(app, 2)

    # No real message: the failure is stored without the job's canvas context.
    _fail_exhausted(supervisor, app.tasks['unit.resumable'], 'job-1', 3, 'lost',
                    message=None)

    assert app.AsyncResult('job-1').state == 'FAILURE'
    assert store.superseded('job-1', 2), 'a paused last attempt must not go on'
    assert not store.save_progress('job-1', 2, {'done': 1, 'attempt': 2})
