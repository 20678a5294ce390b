"""The shape check a job message passes before Celery unpacks its body."""

import pytest
from celery import Celery, chain, chord, group
from kombu.serialization import dumps, loads

from celery_turnout.intake import _body_problem


@pytest.fixture
def app():
    return Celery('intake', set_as_current=False)


def wire_body(app, **options):
    """The body of a job message as a worker decodes it from JSON."""
    message = app.amqp.as_task_v2('job-1', 't.long', args=(1,), kwargs={'b': 2},
                                  **options)
    content_type, encoding, data = dumps(message.body, serializer='json')
    return loads(data, content_type, encoding)


def test_the_embedded_signatures_celery_itself_sends_pass(app):
    add = app.signature('t.add', args=(1,))
    body = wire_body(
        app,
        callbacks=[add, group(add, add)],
        errbacks=[app.signature('t.add'), 't.add'],
        chain=list(reversed(chain(add, add).tasks)),
        chord=chord([add, add], add).body,
    )
    assert set(body[2]) >= {'callbacks', 'errbacks', 'chain', 'chord'}
    assert _body_problem(body) is None


def test_a_body_without_embedded_signatures_passes(app):
    assert _body_problem(wire_body(app)) is None
    assert _body_problem([[1], {}, None]) is None


@pytest.mark.parametrize('embed, problem', [
    ({'callbacks': 't.add'}, 'embedded callbacks are a str'),
    ({'callbacks': [None]}, 'callbacks hold None, which is not a task signature'),
    ({'callbacks': [{'args': []}]}, "callbacks hold {'args': []}, which is not"),
    ({'errbacks': [3]}, 'errbacks hold 3,'),
    ({'chain': {'task': 't.add'}}, 'embedded chain are a dict'),
    ({'chain': ['t.add']}, "chain hold 't.add',"),
    ({'chord': 't.add'}, "embedded chord is 't.add', not a task signature"),
    ({'chord': {'task': 5}}, "embedded chord is {'task': 5},"),
])
def test_a_malformed_embedded_signature_is_named(embed, problem):
    assert problem in _body_problem([[1], {}, embed])
