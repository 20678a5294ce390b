"""The text the ``celery turnout`` command prints, and its exit status."""

from __future__ import annotations

import json
from types import SimpleNamespace

from click.testing import CliRunner

from celery_turnout import cli

NOW = 1_000_000.0

JOB = {
    'id': '0ec979b1-abef-4d0e-9a87-48316421f34a', 'task': 'billing.rebuild',
    'attempt': 2, 'owner': 'a@vm', 'started': NOW - 125, 'proven': NOW - 0.4,
    'state': 'running',
    'progress': {'done': 4, 'total': 8, 'note': 'ledger 4', 'attempt': 2,
                 'at': NOW - 1, 'moved': NOW - 1},
}


def test_the_jobs_table_shows_owner_attempt_age_progress_and_proof_of_life():
    header, row = cli.jobs_table([JOB], NOW)
    assert header.split() == [
        'JOB', 'TASK', 'OWNER', 'ATTEMPT', 'AGE', 'PROGRESS', 'PROVEN']
    assert row.startswith(JOB['id'])
    for text in ('billing.rebuild', 'a@vm', '2m05s',
                 '[##########----------]  50% 4/8 ledger 4', '0.4s ago'):
        assert text in row


def test_a_job_without_progress_or_proof_yet_says_so():
    job = dict(JOB, progress=None, proven=None, state='queued')
    _, row = cli.jobs_table([job], NOW)
    assert 'queued' in row and 'not yet' in row


def test_answers_of_several_workers_are_merged_and_errors_kept():
    other = dict(JOB, id='b', started=NOW - 900, owner='b@vm')
    held, errors = cli.gather_jobs([
        {'a@vm': {'ok': [JOB]}}, {'b@vm': {'ok': [other]}},
        {'c@vm': {'error': 'turnout supervision is not running on this worker'}},
    ])
    assert [job['id'] for job in held] == ['b', JOB['id']], 'oldest first'
    assert errors == {'c@vm': 'turnout supervision is not running on this worker'}


def test_progress_without_a_total_is_a_count():
    assert cli.progress_text({'done': 12, 'total': None}) == '12 done'
    assert cli.progress_text({'done': 1.0, 'total': 4.0}).endswith(' 25% 1/4')


def test_durations_read_like_a_person_would_say_them():
    assert [cli.duration(s) for s in (0.42, 42, 185, 7620)] == [
        '0.4s', '42s', '3m05s', '2h07m']


class FakeBackend:
    """A result backend whose job moves through the given states, one per read."""

    def __init__(self, *metas):
        self.metas = list(metas)

    def get_task_meta(self, job_id, cache=False):
        return self.metas.pop(0) if len(self.metas) > 1 else self.metas[0]


class FakeStore:
    def __init__(self, progress=None, history=()):
        self._progress = progress
        self._history = list(history)

    def progress(self, job_id):
        return self._progress

    def history(self, job_id):
        return self._history

    def checkpoint(self, job_id):
        return None

    def cancelled(self, job_id):
        return None


A_PROGRESS = {'done': 3, 'total': 4, 'note': None, 'attempt': 2}


def watch(monkeypatch, *metas, args=(), store=None):
    app = SimpleNamespace(backend=FakeBackend(*metas))
    store = store or FakeStore(progress=A_PROGRESS)
    monkeypatch.setattr(cli, 'store_for', lambda app: store)
    monkeypatch.setattr(cli, 'WATCH_PERIOD', 0)
    return CliRunner().invoke(cli.turnout, ['watch', 'job-1', *args],
                              obj=SimpleNamespace(app=app))


def test_watch_follows_the_job_and_exits_zero_on_success(monkeypatch):
    result = watch(
        monkeypatch,
        {'status': 'PROGRESS', 'result': {'attempt': 2, 'done': 3, 'total': 4}},
        {'status': 'SUCCESS', 'result': 7},
        args=['--json'],
    )
    assert result.exit_code == 0, result.output
    updates = [json.loads(line) for line in result.output.splitlines()]
    assert [u['state'] for u in updates] == ['PROGRESS', 'SUCCESS']
    assert updates[0]['attempt'] == 2 and updates[0]['done'] == 3


def test_watch_exits_non_zero_when_the_job_fails_or_is_revoked(monkeypatch):
    failed = watch(monkeypatch, {'status': 'FAILURE', 'result': ValueError('bad')})
    assert failed.exit_code == 1
    assert 'FAILURE' in failed.output and 'bad' in failed.output
    revoked = watch(monkeypatch, {'status': 'REVOKED', 'result': 'cancelled'})
    assert revoked.exit_code == 1


def test_watch_gives_up_after_its_timeout_with_status_two(monkeypatch):
    result = watch(monkeypatch, {'status': 'STARTED', 'result': {'attempt': 1}},
                   args=['--timeout', '0'])
    assert result.exit_code == 2


def test_watch_of_an_id_turnout_has_no_record_of_says_why_it_waits(monkeypatch):
    result = watch(monkeypatch, {'status': 'PENDING', 'result': None},
                   store=FakeStore(), args=['--timeout', '0'])
    assert result.exit_code == 2
    assert 'turnout has no record of job job-1 yet' in result.output
    assert 'still waits in a broker queue' in result.output


def test_watch_says_nothing_of_records_for_a_job_a_worker_admitted(monkeypatch):
    admitted = {'event': 'started', 'attempt': 1, 'worker': 'a@vm', 'at': NOW}
    result = watch(monkeypatch, {'status': 'PENDING', 'result': None},
                   store=FakeStore(history=[admitted]), args=['--timeout', '0'])
    assert 'no record' not in result.output


def test_watch_follows_a_pending_job_that_a_worker_admitted(monkeypatch):
    admitted = {'event': 'started', 'attempt': 1, 'worker': 'a@vm', 'at': NOW}
    result = watch(
        monkeypatch, {'status': 'PENDING', 'result': None},
        {'status': 'SUCCESS', 'result': 7}, store=FakeStore(history=[admitted]),
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith('PENDING')


def test_show_of_an_unknown_id_gives_the_same_reason_as_watch(monkeypatch):
    app = SimpleNamespace(
        backend=FakeBackend({'status': 'PENDING', 'result': None}),
        AsyncResult=lambda job_id: SimpleNamespace(state='PENDING'),
    )
    monkeypatch.setattr(cli, 'store_for', lambda app: FakeStore())
    result = CliRunner().invoke(cli.turnout, ['show', 'job-1'],
                                obj=SimpleNamespace(app=app))
    assert result.exit_code == 1
    assert 'turnout has no record of job job-1' in result.output


class FakeControl:
    """Answers a broadcast with the replies of the workers given."""

    def __init__(self, replies):
        self.replies = replies
        self.asked = None

    def broadcast(self, command, reply, timeout, destination, limit):
        self.asked = destination
        return [r for r in self.replies
                if destination is None or next(iter(r)) in destination]


def jobs(replies, *args):
    control = FakeControl(replies)
    app = SimpleNamespace(control=control)
    result = CliRunner().invoke(
        cli.turnout, ['jobs', *args], obj=SimpleNamespace(app=app))
    return result, control


def test_jobs_says_on_stderr_which_workers_answered_and_that_others_may_not_have():
    result, _ = jobs([{'a@vm': {'ok': [JOB]}}, {'b@vm': {'ok': []}}])
    assert result.exit_code == 0
    assert JOB['id'] in result.stdout
    assert '2 worker(s) answered within 2 s: a@vm, b@vm' in result.stderr
    assert 'did not answer in time is not listed' in result.stderr


def test_jobs_names_an_expected_worker_that_did_not_answer_and_fails():
    result, control = jobs([{'a@vm': {'ok': [JOB]}}, {'b@vm': {'ok': []}}],
                           '--destination', 'a@vm, c@vm')
    assert control.asked == ['a@vm', 'c@vm']
    assert result.exit_code == 1
    assert JOB['id'] in result.stdout, 'the answers that came are still shown'
    assert 'No answer within 2 s from c@vm' in result.stderr


def test_jobs_with_no_answer_at_all_does_not_claim_that_nothing_runs():
    result, _ = jobs([], '--timeout', '0.5')
    assert result.exit_code == 1
    assert 'No turnout jobs are running' not in result.stdout
    assert 'No worker answered within 0.5 s' in result.stderr


def test_jobs_json_lists_who_answered_and_who_did_not():
    result, _ = jobs([{'a@vm': {'ok': [JOB]}}], '--json', '-d', 'a@vm,b@vm')
    assert result.exit_code == 1
    table = json.loads(result.stdout)
    assert table['answered'] == ['a@vm'] and table['unanswered'] == ['b@vm']
    assert [job['id'] for job in table['jobs']] == [JOB['id']]


def test_every_subcommand_has_help_text():
    for name, command in cli.turnout.commands.items():
        assert command.help and command.help.split('\n')[0], name


def test_cancel_of_an_id_no_worker_admitted_says_so(monkeypatch):
    app = SimpleNamespace()
    monkeypatch.setattr(cli, 'store_for', lambda app: FakeStore())
    monkeypatch.setattr(cli, 'cancel_job', lambda app, job_id, reason: True)
    result = CliRunner().invoke(cli.turnout, ['cancel', 'no-such-job'],
                                obj=SimpleNamespace(app=app))
    assert result.exit_code == 0, result.output
    assert 'No worker has admitted it yet' in result.output


def test_show_explains_pending_for_a_job_a_worker_runs(monkeypatch):
    app = SimpleNamespace(
        backend=FakeBackend({'status': 'PENDING', 'result': None}),
        AsyncResult=lambda job_id: SimpleNamespace(state='PENDING'),
    )
    admitted = {'event': 'started', 'attempt': 2, 'worker': 'a@vm', 'at': NOW}
    monkeypatch.setattr(cli, 'store_for', lambda app: FakeStore(history=[admitted]))
    result = CliRunner().invoke(cli.turnout, ['show', 'job-1'],
                                obj=SimpleNamespace(app=app))
    assert result.exit_code == 0, result.output
    assert ('state: PENDING in the result backend, while attempt 2 runs or waits '
            'on a@vm') in result.output
