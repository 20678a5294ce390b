"""The chaos run's report tells a lost job from a held or waiting one.

Each test builds a tiny saved run by hand (the shape ``chaos.run`` writes to
``run.json``, and the job records) and checks one rule of ``chaos.analysis``.
Times are seconds from 1000; the supervise interval is 1 s.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos.__main__ import report as print_report  # noqa: E402
from chaos.analysis import compute  # noqa: E402

JOB = 'job-a'
DEADLINE = 1900.0


def a_run(jobs=(JOB,), states=None, history=None, workers=None, processes=(),
          disruptions=(), running=(), waiting=None):
    """A saved run of two workers, w1 and w2, that both lived to the end."""
    return {
        'config': {
            'broker': 'redis', 'minutes': 5, 'workers': 2, 'concurrency': 2,
            'interval': 1.0, 'shortest': 3, 'longest': 60, 'drain_seconds': 600,
            'seed': 1,
        },
        'command': 'test', 'code': 'test', 'directory': 'test',
        'chaos_to': 1300.0, 'drained': DEADLINE, 'horizon': DEADLINE + 1,
        'jobs': [{'id': job} for job in jobs],
        'states': states or {job: 'PENDING' for job in jobs},
        'history': history or {},
        'workers': workers or [a_worker('w1', 11), a_worker('w2', 22)],
        'processes': list(processes),
        'disruptions': list(disruptions),
        'running_at_end': list(running),
        'waiting_at_end': waiting,
        'failures': [],
    }


def a_worker(name, pid, exited=None):
    return {'name': name, 'pid': pid, 'log': f'/nonexistent/{name}.log',
            'spawned': 1000.0, 'ready': 1001.0, 'exited': exited}


def event(name, attempt, worker, at, **detail):
    return {'event': name, 'attempt': attempt, 'worker': worker, 'at': at, **detail}


def record(name, attempt, worker, pid, at, process_start=None, job=JOB):
    return {'job': job, 'attempt': attempt, 'worker': worker, 'pid': pid,
            'event': name, 'time': at, 'process_start': process_start}


def a_life(pid, group, started, first_seen, gone_at=None):
    return {'pid': pid, 'group': group, 'started': started,
            'first_seen': first_seen, 'gone_at': gone_at}


ADMITTED_BY_W2 = [event('started', 1, 'w2', 1500.0), event('covered', 1, 'w2', 1500.5)]


def test_a_job_a_live_worker_admitted_but_never_started_is_held_not_lost():
    report = compute(a_run(history={JOB: ADMITTED_BY_W2}), [], '')

    assert report.lost == []
    assert report.held == {JOB: ('w2', 1)}
    assert report.ok
    lines = report.lines()
    assert ('held unstarted by a live worker at the drain deadline: 1 (w2: 1)'
            in lines)
    assert any(line.startswith(f'HELD UNSTARTED {JOB} attempt 1 by w2')
               for line in lines)


def test_a_job_held_by_its_worker_after_it_fenced_its_own_older_copy_is_held():
    # w2 took over w1's job, got the next attempt itself and is still waiting
    # for a pool process; w1 obeyed the fence for the older attempt later on.
    history = [
        event('started', 1, 'w1', 1100.0),
        event('taken_over', 2, 'w1', 1110.0, by='w2'),
        event('started', 2, 'w2', 1111.0),
        event('covered', 2, 'w2', 1111.5),
        event('fenced', 1, 'w1', 1112.0, by='w2'),
    ]
    report = compute(a_run(history={JOB: history}), [], '')
    assert report.held == {JOB: ('w2', 2)} and report.lost == []


def test_a_job_held_by_a_worker_that_died_before_the_deadline_is_lost():
    workers = [a_worker('w1', 11), a_worker('w2', 22, exited=1600.0)]
    report = compute(a_run(history={JOB: ADMITTED_BY_W2}, workers=workers), [], '')

    assert report.lost == [JOB] and report.held == {}
    assert not report.ok


def test_a_job_whose_only_copy_died_without_finishing_is_lost_not_held():
    records = [record('start', 1, 'w2', 201, 1501.0, process_start=7)]
    processes = [a_life(201, 22, 7, 1501.1, gone_at=1520.0)]
    report = compute(
        a_run(history={JOB: ADMITTED_BY_W2}, processes=processes), records, '',
    )
    assert report.lost == [JOB] and report.held == {}


def test_a_job_fenced_on_its_holder_is_lost_when_nobody_re_dispatched_it():
    history = [*ADMITTED_BY_W2, event('fenced', 1, 'w2', 1510.0, by='w1')]
    report = compute(a_run(history={JOB: history}), [], '')
    assert report.lost == [JOB]


RE_DISPATCHED = [
    event('started', 1, 'w1', 1100.0), event('taken_over', 2, 'w1', 1110.0, by='w2'),
]


def test_a_re_dispatched_job_still_in_the_queue_is_waiting_not_lost():
    report = compute(
        a_run(history={JOB: RE_DISPATCHED}, waiting={JOB: 'queue'}), [], '',
    )
    assert report.lost == [] and report.waiting == {JOB: 'queue'}
    assert report.ok
    assert 'waiting in the broker at the drain deadline: 1' in report.lines()


def test_a_re_dispatched_job_neither_queued_nor_held_is_lost():
    report = compute(a_run(history={JOB: RE_DISPATCHED}, waiting={}), [], '')
    assert report.lost == [JOB] and not report.ok


def test_a_run_without_a_record_of_the_queue_counts_waiting_jobs_as_lost_saying_so():
    report = compute(a_run(history={JOB: RE_DISPATCHED}, waiting=None), [], '')
    assert report.lost == [JOB]
    lines = report.lines()
    assert ('waiting in the broker at the drain deadline: not recorded by this run'
            in lines)
    assert any(line.startswith('note: this run did not record what waited')
               for line in lines)


def test_a_revoked_job_is_lost_even_if_a_worker_admitted_it():
    report = compute(
        a_run(history={JOB: ADMITTED_BY_W2}, states={JOB: 'REVOKED'}), [], '',
    )
    assert report.lost == [JOB] and report.held == {}


# Fence lag: w1 is killed at 1200 while attempt 1 runs in pool process 101;
# attempt 2 starts on w2 at 1202.
KILLED_W1 = [{'worker': 'w1', 'kind': 'kill', 'at': 1200.0, 'until': 1200.2,
              'target': 'main', 'planned': 0.0}]
TWO_ATTEMPTS = [
    record('start', 1, 'w1', 101, 1100.0, process_start=5),
    record('start', 2, 'w2', 202, 1202.0, process_start=9),
    record('finish', 2, 'w2', 202, 1230.0, process_start=9),
]
W2_POOL = a_life(202, 22, 9, 1202.1, gone_at=None)
DONE = {JOB: 'SUCCESS'}


def test_the_fence_lag_runs_from_the_later_start_to_the_watched_death():
    processes = [a_life(101, 11, 5, 1100.1, gone_at=1202.5), W2_POOL]
    workers = [a_worker('w1', 11, exited=1200.2), a_worker('w2', 22)]
    report = compute(
        a_run(workers=workers, processes=processes, disruptions=KILLED_W1,
              states=DONE),
        TWO_ATTEMPTS, '',
    )
    (overlap,) = report.overlaps
    assert overlap.fenced and abs(overlap.lag - 0.5) < 1e-9
    assert report.unknown_lags == []


def test_a_fenced_copy_whose_process_was_never_watched_has_no_made_up_lag():
    # Without pid 101 in the watch's list, the copy would seem to run until
    # the end of the run, and its lag would be some 700 s.
    report = compute(
        a_run(processes=[W2_POOL], disruptions=KILLED_W1, states=DONE),
        TWO_ATTEMPTS, '',
    )
    (overlap,) = report.overlaps
    assert overlap.fenced and overlap.lag is None
    assert report.unknown_lags == [overlap]
    lines = report.lines()
    assert ('fence lag: max - intervals; slow fences (> 1 interval + 1 s): 0; '
            "unknown (copy's process never seen): 1") in lines
    assert any(line.startswith(f'FENCE LAG UNKNOWN {JOB}') for line in lines)
    assert report.ok


# w1 is paused at 1198 until 1204.5, taken over (attempt 2 on w2 at 1202),
# runs 0.5 s and is paused again from 1205 to 1211, then kills its copy at 1211.3.
PAUSED_TWICE = [
    {'worker': 'w1', 'kind': 'stop', 'at': 1198.0, 'until': 1204.5,
     'target': 'group', 'planned': 6.5},
    {'worker': 'w1', 'kind': 'stop', 'at': 1205.0, 'until': 1211.0,
     'target': 'main', 'planned': 6.0},
]


def test_a_second_pause_after_the_resume_does_not_count_as_fence_lag():
    processes = [a_life(101, 11, 5, 1100.1, gone_at=1211.3), W2_POOL]
    report = compute(
        a_run(processes=processes, disruptions=PAUSED_TWICE, states=DONE),
        TWO_ATTEMPTS, '',
    )
    (overlap,) = report.overlaps
    # 0.5 s from the resume to the second pause, 0.3 s after it.
    assert overlap.fenced and abs(overlap.lag - 0.8) < 1e-9


def test_a_pause_of_a_worker_whose_copies_were_already_taken_over_misses_nothing():
    processes = [a_life(101, 11, 5, 1100.1, gone_at=1211.3), W2_POOL]
    taken = {JOB: [event('taken_over', 2, 'w1', 1201.5)]}
    report = compute(
        a_run(processes=processes, disruptions=PAUSED_TWICE, states=DONE,
              history=taken),
        TWO_ATTEMPTS, '',
    )
    assert report.pauses['long_taken'] == 1
    assert report.missed == []


def test_a_copy_is_matched_to_its_process_by_start_time_even_when_seen_late():
    # The watch first saw the process 5 s after its record (a starved watch),
    # and the same pid was used before by another process.
    processes = [
        a_life(101, 11, 2, 1000.0, gone_at=1050.0),
        a_life(101, 11, 5, 1105.0, gone_at=1202.5),
        W2_POOL,
    ]
    report = compute(
        a_run(processes=processes, disruptions=KILLED_W1, states=DONE),
        TWO_ATTEMPTS, '',
    )
    (overlap,) = report.overlaps
    assert overlap.older.watched and overlap.older.how == 'died'
    assert abs(overlap.lag - 0.5) < 1e-9


def test_two_copies_of_one_attempt_at_once_are_unfenced_and_fail_the_run():
    records = [
        record('start', 1, 'w1', 101, 1100.0, process_start=5),
        record('start', 1, 'w2', 202, 1105.0, process_start=9),
    ]
    processes = [a_life(101, 11, 5, 1100.1), a_life(202, 22, 9, 1105.1)]
    report = compute(a_run(processes=processes, running=[JOB]), records, '')
    assert len(report.unfenced) == 1 and not report.ok


def save(directory, run, records=()):
    (directory / 'records').mkdir(parents=True)
    lines = ''.join(json.dumps(r) + '\n' for r in records)
    (directory / 'records' / f'{JOB}.jsonl').write_text(lines)
    (directory / 'run.json').write_text(json.dumps(run))
    return directory


def test_the_exit_status_fails_a_real_loss_but_not_a_held_job(tmp_path, capsys):
    held = save(tmp_path / 'held', a_run(history={JOB: ADMITTED_BY_W2}))
    assert print_report(held) == 0
    assert 'held unstarted by a live worker at the drain deadline: 1 (w2: 1)' in (
        capsys.readouterr().out)

    workers = [a_worker('w1', 11), a_worker('w2', 22, exited=1600.0)]
    run = a_run(history={JOB: ADMITTED_BY_W2}, workers=workers)
    lost = save(tmp_path / 'lost', run)
    assert print_report(lost) == 1
    assert 'FAILED: lost jobs' in capsys.readouterr().out
