"""The semantics every claim store must have, run against each implementation."""

from __future__ import annotations

import json
import time

import pytest

from celery_turnout.store import KEPT_FENCE_LIMIT, Store, Verdict

EVENT = {'event': 'started', 'worker': 'w1', 'at': 0.0}


def admit(store: Store, job='job-1', attempt=1, copy='copy-a', last=4):
    return store.admit(job, attempt, copy, b'message-bytes', last, EVENT)


def the_first_copy_of_an_attempt_starts_it(store: Store) -> None:
    admission = admit(store)
    assert (admission.verdict, admission.attempt) == (Verdict.START, 1)
    assert store.message('job-1') == b'message-bytes'
    assert [e['attempt'] for e in store.history('job-1')] == [1]


def another_copy_of_the_same_attempt_is_a_duplicate(store: Store) -> None:
    admit(store, copy='copy-a')
    admission = admit(store, copy='copy-b')
    assert admission.verdict is Verdict.DUPLICATE
    assert admission.holder == 'copy-a'


def a_redelivered_copy_starts_as_the_next_attempt(store: Store) -> None:
    admit(store, copy='copy-a')
    admission = admit(store, copy='copy-a')
    assert (admission.verdict, admission.attempt) == (Verdict.START, 2)


def a_finished_job_never_starts_again(store: Store) -> None:
    admit(store, copy='copy-a')
    assert store.finish('job-1', 1, 'w1')
    assert admit(store, attempt=2, copy='takeover-copy').verdict is Verdict.FINISHED
    assert admit(store, copy='copy-a').verdict is Verdict.FINISHED


def finishing_twice_is_idempotent_but_a_superseded_attempt_cannot_finish(
    store: Store,
) -> None:
    admit(store, copy='copy-a')
    admit(store, attempt=2, copy='takeover-copy')
    assert store.superseded('job-1', 1)
    assert not store.finish('job-1', 1, 'w1')
    assert store.finish('job-1', 2, 'w2')
    assert store.finish('job-1', 2, 'w2')


def a_cancelled_job_starts_no_copy(store: Store) -> None:
    store.cancel('job-1', 'operator asked')
    admission = admit(store)
    assert admission.verdict is Verdict.CANCELLED
    assert admission.holder == 'operator asked'
    assert store.superseded('job-1', 1)


def an_attempt_past_the_last_one_is_exhausted_and_claims_nothing(store: Store) -> None:
    admission = admit(store, attempt=5, copy='copy-x', last=4)
    assert admission.verdict is Verdict.EXHAUSTED
    assert admit(store, attempt=4, copy='copy-y', last=4).verdict is Verdict.START


def the_history_keeps_events_in_order(store: Store) -> None:
    admit(store)
    store.log('job-1', {'event': 'covered', 'attempt': 1}, {'event': 'finished'})
    assert [e['event'] for e in store.history('job-1')] == [
        'started', 'covered', 'finished']


def a_cancelled_job_cannot_be_marked_finished(store: Store) -> None:
    admit(store)
    store.cancel('job-1', 'operator asked')
    assert not store.finish('job-1', 1, 'w1')
    assert admit(store, attempt=2, copy='takeover-copy').verdict is Verdict.CANCELLED


def progress_and_checkpoints_are_kept_for_the_next_attempt(store: Store) -> None:
    admit(store)
    assert store.progress('job-1') is None and store.checkpoint('job-1') is None
    assert store.save_progress('job-1', 1, {'done': 3, 'total': 10, 'attempt': 1})
    assert store.save_checkpoint('job-1', 1, {'row': 4}, {'done': 4, 'attempt': 1})

    admit(store, attempt=2, copy='takeover-copy')
    assert store.progress('job-1') == {'done': 4, 'attempt': 1}
    checkpoint = store.checkpoint('job-1')
    assert checkpoint is not None
    assert (checkpoint['state'], checkpoint['attempt']) == ({'row': 4}, 1)
    assert store.progress_of(['job-1', 'job-2']) == [{'done': 4, 'attempt': 1}, None]


def a_superseded_attempt_can_write_neither_progress_nor_checkpoints(
    store: Store,
) -> None:
    admit(store)
    admit(store, attempt=2, copy='takeover-copy')
    assert store.save_progress('job-1', 2, {'done': 1, 'attempt': 2})
    assert not store.save_progress('job-1', 1, {'done': 9, 'attempt': 1})
    assert not store.save_checkpoint('job-1', 1, {'row': 9}, {'done': 9})
    assert store.progress('job-1') == {'done': 1, 'attempt': 2}
    assert store.checkpoint('job-1') is None


def a_finished_or_cancelled_job_takes_no_more_progress(store: Store) -> None:
    admit(store)
    store.finish('job-1', 1, 'w1')
    assert not store.save_progress('job-1', 1, {'done': 1})
    admit(store, job='job-2')
    store.cancel('job-2', 'operator asked')
    assert not store.save_checkpoint('job-2', 1, {'row': 1})


def a_check_is_claimed_once_when_due_and_again_after_its_lease(store: Store) -> None:
    now = time.time()
    store.post_check(now + 5, json.dumps({'tick': 1}))
    assert store.claim_checks(now, 2.0, 10)[0] == []
    assert store.claim_checks(now, 2.0, 10)[1] == pytest.approx(now + 5, abs=1e-3)

    checks, _ = store.claim_checks(now + 5, 2.0, 10)
    assert [json.loads(body) for _, body in checks] == [{'tick': 1}]
    assert store.claim_checks(now + 6, 2.0, 10)[0] == []
    again, _ = store.claim_checks(now + 7.5, 2.0, 10)
    assert len(again) == 1

    store.complete_check(again[0][0])
    assert store.claim_checks(now + 100, 2.0, 10) == ([], None)


def fence_notices_are_kept_per_owner_in_order(store: Store) -> None:
    assert store.kept_fences('w1@host.abc') == []
    store.keep_fence('w1@host.abc', '{"jobs": [["job-1", 1]]}')
    store.keep_fence('w2@host.def', '{"jobs": []}')
    store.keep_fence('w1@host.abc', '{"jobs": [["job-2", 3]]}')
    assert store.kept_fences('w1@host.abc') == [
        '{"jobs": [["job-1", 1]]}', '{"jobs": [["job-2", 3]]}',
    ]
    assert store.kept_fences('w2@host.def') == ['{"jobs": []}']


def only_the_newest_fence_notices_are_kept(store: Store) -> None:
    for n in range(KEPT_FENCE_LIMIT + 2):
        store.keep_fence('w1@host.abc', f'{{"n": {n}}}')
    kept = store.kept_fences('w1@host.abc')
    assert len(kept) == KEPT_FENCE_LIMIT
    assert kept[0] == '{"n": 2}' and kept[-1] == f'{{"n": {KEPT_FENCE_LIMIT + 1}}}'


CONTRACT = [
    the_first_copy_of_an_attempt_starts_it,
    another_copy_of_the_same_attempt_is_a_duplicate,
    a_redelivered_copy_starts_as_the_next_attempt,
    a_finished_job_never_starts_again,
    finishing_twice_is_idempotent_but_a_superseded_attempt_cannot_finish,
    a_cancelled_job_starts_no_copy,
    an_attempt_past_the_last_one_is_exhausted_and_claims_nothing,
    the_history_keeps_events_in_order,
    a_check_is_claimed_once_when_due_and_again_after_its_lease,
    a_cancelled_job_cannot_be_marked_finished,
    progress_and_checkpoints_are_kept_for_the_next_attempt,
    a_superseded_attempt_can_write_neither_progress_nor_checkpoints,
    a_finished_or_cancelled_job_takes_no_more_progress,
    fence_notices_are_kept_per_owner_in_order,
    only_the_newest_fence_notices_are_kept,
]
