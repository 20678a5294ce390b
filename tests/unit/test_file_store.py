"""The directory store keeps the claim semantics, also across processes."""

import multiprocessing
import os

import pytest
from store_contract import CONTRACT

from celery_turnout.store import FileStore, Verdict


@pytest.fixture
def store(tmp_path):
    return FileStore(str(tmp_path), 'test', ttl=60)


@pytest.mark.parametrize('rule', CONTRACT, ids=lambda rule: rule.__name__)
def test_the_file_store_keeps_the_rule(rule, store):
    rule(store)


def _race(root, copy, results):
    store = FileStore(root, 'test', ttl=60)
    results.put(store.admit('job-1', 1, copy, b'm', 4, {'event': 'started'}).verdict)


def test_of_many_processes_racing_for_one_attempt_exactly_one_starts_it(tmp_path):
    results = multiprocessing.Queue()
    racers = [
        multiprocessing.Process(
            target=_race, args=(str(tmp_path), f'copy-{n}', results),
        )
        for n in range(8)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)
    verdicts = [results.get(timeout=5) for _ in racers]
    assert verdicts.count(Verdict.START) == 1
    assert verdicts.count(Verdict.DUPLICATE) == 7


def test_a_job_id_that_is_no_safe_file_name_still_gets_its_own_folder(store):
    store.admit('../../etc/passwd', 1, 'c', b'm', 4, {'event': 'started'})
    assert store.message('../../etc/passwd') == b'm'
    assert store.message('passwd') is None


def test_a_torn_line_among_the_kept_fences_is_skipped(tmp_path):
    store = FileStore(str(tmp_path), 'test', ttl=60)
    store.keep_fence('w1@host.abc', '{"jobs": [["job-1", 1]]}')
    with open(os.path.join(store._fences_folder('w1@host.abc'), 'fences'), 'a') as f:
        f.write('"{\\"jobs\\": [[\n')
    store.keep_fence('w1@host.abc', '{"jobs": [["job-2", 1]]}')
    assert store.kept_fences('w1@host.abc') == [
        '{"jobs": [["job-1", 1]]}', '{"jobs": [["job-2", 1]]}',
    ]
