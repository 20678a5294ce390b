"""A leaving worker settles its task consumer's pending Redis read, or says why not."""

import logging
from queue import Empty
from types import SimpleNamespace

import pytest

from celery_turnout.bootstep import PENDING_READ_SLACK, _finish_pending_read


class PendingRead:
    """Stands in for the Redis connection that has a BRPOP in flight."""

    def __init__(self, answers=True):
        self.answers = answers
        self.waited = None

    def can_read(self, timeout=0):
        self.waited = timeout
        return self.answers


def a_consumer(pending, read=None, protected=False, brpop_timeout=1):
    channel = SimpleNamespace(
        _in_poll=pending, brpop_timeout=brpop_timeout,
        connection=SimpleNamespace(cycle=SimpleNamespace(
            _in_protected_read=protected)),
    )
    if read is not None:
        channel._brpop_read = read
    return SimpleNamespace(channel=channel)


def test_a_pending_read_is_taken_in_within_the_servers_timeout_and_some_slack():
    reads = []
    pending = PendingRead()
    _finish_pending_read(a_consumer(pending, lambda: reads.append(1),
                                    brpop_timeout=3), 'w1@host')
    assert reads == [1]
    assert pending.waited == 3 + PENDING_READ_SLACK


@pytest.mark.parametrize('consumer', [
    a_consumer(None, lambda: pytest.fail('nothing is pending')),
    a_consumer(PendingRead(), None),
    a_consumer(PendingRead(), lambda: pytest.fail('the loop reads it'),
               protected=True),
    SimpleNamespace(channel=SimpleNamespace()),
], ids=['nothing-pending', 'another-transport', 'loop-reading', 'bare-channel'])
def test_a_consumer_with_no_read_of_its_own_to_settle_is_left_alone(consumer):
    _finish_pending_read(consumer, 'w1@host')


def test_a_read_that_times_out_empty_is_fine(caplog):
    def empty():
        raise Empty()

    with caplog.at_level(logging.WARNING, logger='celery_turnout.bootstep'):
        _finish_pending_read(a_consumer(PendingRead(), empty), 'w1@host')
    assert caplog.text == ''


@pytest.mark.parametrize('pending, read, problem', [
    (PendingRead(answers=False), lambda: pytest.fail('must not block'),
     'no answer within 3 s'),
    (PendingRead(), lambda: (_ for _ in ()).throw(ConnectionError('reset')),
     "ConnectionError('reset')"),
], ids=['half-open', 'connection-error'])
def test_a_read_that_cannot_be_settled_is_logged_and_the_hand_off_goes_on(
    pending, read, problem, caplog,
):
    with caplog.at_level(logging.WARNING, logger='celery_turnout.bootstep'):
        _finish_pending_read(a_consumer(pending, read), 'w1@host')
    assert (f'Worker w1@host could not take in the pending Redis read of its task '
            f'consumer ({problem})') in caplog.text
