"""Turnout's message bodies round-trip and reject every malformed shape."""

import pytest
from kombu import Connection, Queue

from celery_turnout.errors import MalformedMessage
from celery_turnout.messages import (
    ATTEMPT_HEADER,
    COPY_HEADER,
    Fence,
    Monitor,
    StoredMessage,
    attempt_of,
    copy_id,
)


def a_monitor(**changes):
    fields = dict(owner='w1@host.abc', lane='t.supervise.w1.0', control='t.control.w1',
                  tick=3, due=1000.5, jobs=(('job-1', 1), ('job-2', 2)))
    fields.update(changes)
    return Monitor(**fields)


def test_a_monitor_message_survives_its_body():
    monitor = a_monitor()
    assert Monitor.from_body(monitor.to_body()) == monitor


def test_a_fence_notice_survives_its_body():
    fence = Fence(owner='w1', by='w2', reason='late', jobs=(('job-1', 4),))
    assert Fence.from_body(fence.to_body()) == fence


@pytest.mark.parametrize('body, reason', [
    (None, 'a mapping'),
    ('monitor', 'a mapping'),
    ({'kind': 'fence'}, "kind 'monitor'"),
    ({**a_monitor().to_body(), 'owner': ''}, "'owner'"),
    ({**a_monitor().to_body(), 'tick': '3'}, "'tick'"),
    ({**a_monitor().to_body(), 'tick': True}, "'tick'"),
    ({**a_monitor().to_body(), 'due': 'soon'}, "'due'"),
    ({**a_monitor().to_body(), 'due': float('nan')}, "'due' must be a finite"),
    ({**a_monitor().to_body(), 'due': float('inf')}, "'due' must be a finite"),
    ({**a_monitor().to_body(), 'jobs': 'job-1'}, "'jobs'"),
    ({**a_monitor().to_body(), 'jobs': [['job-1']]}, 'not [job id, attempt]'),
    ({**a_monitor().to_body(), 'jobs': [['job-1', 0]]}, 'not [job id, attempt]'),
    ({**a_monitor().to_body(), 'jobs': [[7, 1]]}, 'not [job id, attempt]'),
])
def test_a_malformed_monitor_body_is_refused_with_the_reason(body, reason):
    with pytest.raises(MalformedMessage, match=reason.replace('[', r'\[')):
        Monitor.from_body(body)


def test_a_stored_message_keeps_body_bytes_headers_and_route():
    with Connection('memory://') as connection:
        queue = Queue('jobs-q', routing_key='jobs-q')
        queue(connection.default_channel).declare()
        producer = connection.Producer()
        producer.publish(
            {'args': [1], 'kwargs': {}}, routing_key='jobs-q', serializer='json',
            headers={'id': 'job-9', 'task': 'app.audit', COPY_HEADER: 'c1'},
            priority=3,
        )
        message = queue(connection.default_channel).get(no_ack=True)
        stored = StoredMessage.loads(StoredMessage.from_message(message).dumps())

    assert stored.body == message.body
    assert stored.task == 'app.audit'
    assert stored.routing_key == 'jobs-q'
    assert stored.headers['id'] == 'job-9'
    assert stored.properties['priority'] == 3
    assert stored.content_type == 'application/json'


def test_a_damaged_stored_message_is_reported_as_malformed():
    with pytest.raises(MalformedMessage, match='damaged'):
        StoredMessage.loads(b'{"task": "x"}')


def test_the_attempt_header_defaults_to_one_and_must_be_positive():
    assert attempt_of({}) == 1
    assert attempt_of({ATTEMPT_HEADER: None}) == 1
    assert attempt_of({ATTEMPT_HEADER: 4}) == 4
    for bad in (0, -1, '2', 2.0, True):
        with pytest.raises(MalformedMessage):
            attempt_of({ATTEMPT_HEADER: bad})


def test_an_unmarked_copy_gets_an_id_that_a_redelivery_reproduces():
    assert copy_id({COPY_HEADER: 'abc'}, 'job', 1) == 'abc'
    assert copy_id({}, 'job', 2) == copy_id({}, 'job', 2)
    assert copy_id({}, 'job', 2) != copy_id({}, 'job', 3)
