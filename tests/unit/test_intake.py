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
        callbacks=[add, group(add, add), chain(add, add), chord([add, add], add)],
        errbacks=[app.signature('t.add'), 't.add'],
        chain=list(reversed(chain(add, add).tasks)),
        chord=chord([add, add], add).body,
    )
    assert set(body[2]) >= {'callbacks', 'errbacks', 'chain', 'chord'}
    assert _body_problem(body) is None


def test_bare_task_names_pass_as_celery_builds_signatures_from_them():
    embed = {'callbacks': ['t.add'], 'errbacks': ['t.add'], 'chain': ['t.add']}
    assert _body_problem([[1], {}, embed]) is None


def test_a_body_without_embedded_signatures_passes(app):
    assert _body_problem(wire_body(app)) is None
    assert _body_problem([[1], {}, None]) is None


@pytest.mark.parametrize('embed, problem', [
    ({'callbacks': 't.add'}, 'embedded callbacks are a str'),
    ({'callbacks': [None]}, 'callbacks hold None, which is not a task signature'),
    ({'callbacks': [{'args': []}]}, "callbacks hold {'args': []}, which is not"),
    ({'errbacks': [3]}, 'errbacks hold 3,'),
    ({'chain': {'task': 't.add'}}, 'embedded chain are a dict'),
    ({'chain': [3]}, 'chain hold 3,'),
    ({'chord': 't.add'}, "embedded chord is 't.add', not a task signature"),
    ({'chord': {'task': 5}}, "embedded chord is {'task': 5},"),
    ({'callbacks': [{'task': 'x', 'args': 5}]}, '(its args are a int, not a list)'),
    ({'callbacks': [{'task': 'x', 'args': 'ab'}]}, 'its args are a str'),
    ({'errbacks': [{'task': 'x', 'kwargs': [1]}]},
     '(its kwargs are a list, not a mapping)'),
    ({'chain': [{'task': 'x', 'options': 'zz'}]},
     '(its options are a str, not a mapping)'),
    ({'callbacks': [{'task': 'x', 'subtask_type': 'weird'}]},
     "(its subtask_type 'weird' is no canvas type Celery knows)"),
    ({'callbacks': [{'task': 'x', 'subtask_type': 3}]}, 'its subtask_type 3 is no'),
    ({'chord': {'task': 'x', 'kwargs': 'y'}}, 'embedded chord is'),
    ({'chord': {'task': 'x', 'subtask_type': 'weird'}}, 'no canvas type Celery'),
])
def test_a_malformed_embedded_signature_is_named(embed, problem):
    assert problem in _body_problem([[1], {}, embed])


def test_signatures_with_empty_or_null_parts_pass():
    signature = {'task': 'x', 'args': None, 'kwargs': None, 'options': None,
                 'subtask_type': None}
    assert _body_problem([[1], {}, {'callbacks': [signature, {'task': 'y'}]}]) is None


def test_a_canvas_type_registered_after_import_passes(monkeypatch):
    from celery.canvas import Signature

    monkeypatch.setitem(Signature.TYPES, 'unit_fanout', Signature)
    signature = {'task': 'x', 'subtask_type': 'unit_fanout'}
    assert _body_problem([[1], {}, {'callbacks': [signature]}]) is None
