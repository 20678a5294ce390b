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
    def progress(self, job_id):
        return {'done': 3, 'total': 4, 'note': None, 'attempt': 2}


def watch(monkeypatch, *metas, args=()):
    app = SimpleNamespace(backend=FakeBackend(*metas))
    monkeypatch.setattr(cli, 'store_for', lambda app: FakeStore())
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


def test_every_subcommand_has_help_text():
    for name, command in cli.turnout.commands.items():
        assert command.help and command.help.split('\n')[0], name
