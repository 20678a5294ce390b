"""The Redis claim store keeps the same semantics as the directory store."""

from __future__ import annotations

import threading
import uuid

import pytest
from conftest import _require
from store_contract import CONTRACT

from celery_turnout.store import RedisStore, Verdict

REDIS_URL = 'redis://127.0.0.1:6379/14'


@pytest.fixture
def store():
    _require('Redis', ('127.0.0.1', 6379))
    store = RedisStore(REDIS_URL, f'test-{uuid.uuid4().hex[:8]}', ttl=60)
    yield store
    client = store._client
    for key in client.scan_iter(f'{store.prefix}:*'):
        client.delete(key)
    store.close()


@pytest.mark.parametrize('rule', CONTRACT, ids=lambda rule: rule.__name__)
def test_the_redis_store_keeps_the_rule(rule, store):
    rule(store)


def test_of_many_threads_racing_for_one_attempt_exactly_one_starts_it(store):
    verdicts = []

    def race(copy):
        verdicts.append(store.admit('job-1', 1, copy, b'm', 4, {}).verdict)

    threads = [threading.Thread(target=race, args=(f'copy-{n}',)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert verdicts.count(Verdict.START) == 1
    assert verdicts.count(Verdict.DUPLICATE) == 15
