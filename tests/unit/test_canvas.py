"""Turnout fails a job with its Celery request, so its errbacks and chord are told."""

import logging

import pytest
from celery import Celery
from kombu.message import Message
from kombu.serialization import dumps

from celery_turnout.canvas import context_of_message, context_of_request, store_failure
from celery_turnout.errors import JobExhausted


@pytest.fixture
def app():
    app = Celery('canvas', set_as_current=False)

    @app.task(name='t.long', shared=False)
    def long(a, b=None):
        return a

    return app


def job_message(app, **options):
    """A job message as the worker receives it, its body still encoded."""
    sent = app.amqp.as_task_v2('job-1', 't.long', args=(1,), kwargs={'b': 2},
                               **options)
    content_type, encoding, data = dumps(sent.body, serializer='json')
    return Message(body=data, content_type=content_type, content_encoding=encoding,
                   headers=sent.headers, delivery_info={'routing_key': 'jobs'},
                   properties={'correlation_id': 'job-1'})


def test_the_context_carries_the_embedded_errbacks_and_chord(app):
    errback = app.signature('t.errback')
    body = app.signature('t.gather')
    message = job_message(app, errbacks=[errback], chord=body, group_id='group-1',
                          group_index=0)

    context = context_of_message(message, app, app.tasks['t.long'], 'w1@host')

    assert context.id == 'job-1'
    assert [s['task'] for s in context.errbacks] == ['t.errback']
    assert context.chord['task'] == 't.gather'
    assert context.group == 'group-1'
    assert context.group_index == 0
    assert context.args == [1] and context.kwargs == {'b': 2}
    assert isinstance(context.delivery_info, dict)


def test_a_context_is_read_from_a_request_the_worker_built(app):
    from celery.worker.request import Request

    step = app.signature('t.step')
    message = job_message(app, errbacks=['t.errback'], chain=[step])
    request = Request(message, app=app, task=app.tasks['t.long'])

    context = context_of_request(request)

    assert context.errbacks == ['t.errback']
    assert [s['task'] for s in context.chain] == ['t.step']
    assert 'errbacks' not in request.request_dict, 'the request is left alone'


class Backend:
    """Records how ``mark_as_failure`` is called; fails when told to."""

    def __init__(self, fail_with_request=False, state='PENDING', fail=False):
        self.calls = []
        self.fail_with_request = fail_with_request
        self.state = state
        self.fail = fail

    def get_task_meta(self, job_id):
        return {'status': self.state}

    def mark_as_failure(self, job_id, exc, request=None):
        self.calls.append((job_id, exc, request))
        if self.fail or request is not None and self.fail_with_request:
            raise RuntimeError('errback could not be sent')


def test_the_failure_is_stored_with_the_context():
    backend, exc = Backend(), JobExhausted('lost')
    store_failure(backend, 'job-1', 3, exc, lambda: 'context')
    assert backend.calls == [('job-1', exc, 'context')]


def test_a_context_that_cannot_be_built_leaves_a_plain_failure(caplog):
    backend, exc = Backend(), JobExhausted('lost')

    def broken():
        raise ValueError('bad ETA')

    with caplog.at_level(logging.WARNING, logger='celery_turnout.canvas'):
        store_failure(backend, 'job-1', 3, exc, broken)

    assert backend.calls == [('job-1', exc, None)]
    assert 'Job job-1 attempt 3: could not rebuild its Celery request' in caplog.text


def test_a_backend_failing_on_the_context_still_stores_the_failure(caplog):
    backend, exc = Backend(fail_with_request=True), JobExhausted('lost')
    with caplog.at_level(logging.ERROR, logger='celery_turnout.canvas'):
        store_failure(backend, 'job-1', 3, exc, lambda: 'context')
    assert backend.calls == [('job-1', exc, 'context'), ('job-1', exc, None)]
    assert 'stored once more without it' in caplog.text


@pytest.mark.parametrize('state', ['SUCCESS', 'FAILURE', 'REVOKED'])
def test_an_outcome_a_copy_stored_first_stands(state, caplog):
    backend, exc = Backend(state=state), JobExhausted('lost')
    with caplog.at_level(logging.WARNING, logger='celery_turnout.canvas'):
        assert store_failure(backend, 'job-1', 3, exc, lambda: 'context') == state
    assert backend.calls == [], 'no errback, chord or chain may be told twice'
    assert f'Job job-1 attempt 3 already has its outcome {state}' in caplog.text


def test_a_backend_that_cannot_store_the_failure_at_all_is_logged(caplog):
    backend, exc = Backend(fail=True), JobExhausted('lost')
    with caplog.at_level(logging.ERROR, logger='celery_turnout.canvas'):
        assert store_failure(backend, 'job-1', 3, exc, lambda: 'context') is None
    assert len(backend.calls) == 2
    assert 'Job job-1 attempt 3 failed for good, but its FAILURE could not' in (
        caplog.text)
