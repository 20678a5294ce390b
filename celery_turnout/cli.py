"""The ``celery turnout`` command: list, show, watch and cancel turnout jobs.

Every subcommand takes ``--json`` and then prints JSON for scripts instead of
text for people.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import click
from celery import Celery
from celery.backends.base import DisabledBackend
from celery.states import PENDING, READY_STATES, SUCCESS

from .cancellation import cancel as cancel_job
from .store import store_for

#: Characters of the progress bar.
BAR_WIDTH = 20
#: Seconds between two looks at a watched job.
WATCH_PERIOD = 0.5

JSON_OPTION = click.option(
    '--json', 'as_json', is_flag=True, help='Print JSON for scripts.',
)


@click.group(name='turnout')
@click.pass_context
def turnout(ctx: click.Context) -> None:
    """Watch and steer turnout jobs."""


@turnout.command()
@click.option('--timeout', default=2.0, show_default=True,
              help='Seconds to wait for the workers to answer.')
@click.option('-d', '--destination', default=None, metavar='NAMES',
              help='Ask only these workers (comma-separated node names); any of '
                   'them that does not answer in time is named on stderr.')
@JSON_OPTION
@click.pass_context
def jobs(ctx: click.Context, timeout: float, destination: str | None,
         as_json: bool) -> None:
    """List the jobs every worker holds: owner, attempt, age, progress.

    Only workers that answer within --timeout are listed. Exit status 1 when no
    worker answered, or when a worker named with --destination did not.
    """
    app: Celery = ctx.obj.app
    expected = _names(destination)
    # Workers answer at once; the broadcast then waits out its timeout.
    asked = time.time()
    replies = app.control.broadcast(
        'turnout-jobs', reply=True, timeout=timeout, destination=expected,
        limit=len(expected) if expected else None,
    )
    held, errors = gather_jobs(replies)
    answered = answered_by(replies)
    missing = sorted(set(expected or ()) - set(answered))
    incomplete = not answered or bool(missing)
    if as_json:
        click.echo(json.dumps({
            'jobs': held, 'errors': errors, 'answered': answered,
            'unanswered': missing,
        }, indent=2))
        ctx.exit(1 if incomplete else 0)
    for worker, error in errors.items():
        click.echo(f'{worker}: {error}', err=True)
    click.echo(answer_note(answered, expected, missing, timeout), err=True)
    if held:
        for line in jobs_table(held, asked):
            click.echo(line)
    elif answered:
        click.echo('No turnout jobs are running on the workers that answered.')
    ctx.exit(1 if incomplete else 0)


def _names(destination: str | None) -> list[str] | None:
    if not destination:
        return None
    return [name.strip() for name in destination.split(',') if name.strip()]


def gather_jobs(
    replies: Iterable[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Flatten the workers' answers to ``turnout-jobs``.

    Returns:
        The jobs, sorted by start time, and the error of each worker that
        answered with one.
    """
    held: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for reply in replies:
        for worker, answer in reply.items():
            if isinstance(answer, Mapping) and 'ok' in answer:
                held.extend(answer['ok'])
            else:
                errors[worker] = str(answer.get('error', answer)
                                     if isinstance(answer, Mapping) else answer)
    held.sort(key=lambda job: job.get('started') or 0)
    return held, errors


def answered_by(replies: Iterable[Mapping[str, Any]]) -> list[str]:
    """The node names of the workers that answered, with jobs or an error."""
    return sorted({worker for reply in replies for worker in reply})


def answer_note(
    answered: list[str], expected: list[str] | None, missing: list[str],
    timeout: float,
) -> str:
    """The stderr line of ``jobs`` that says whose jobs the list can hold.

    A broadcast cannot know which workers exist: a worker that is paused,
    overloaded or cut off from the broker does not answer, and its jobs are
    simply absent. Only names given with ``--destination`` can be missed.
    """
    if missing:
        return (
            f'No answer within {timeout:g} s from {", ".join(missing)} (asked: '
            f'{", ".join(expected or ())}): the jobs they hold are not listed. A '
            'paused, overloaded or stopped worker answers late or never; try a '
            'longer --timeout, or check that the worker runs.'
        )
    if not answered:
        return (
            f'No worker answered within {timeout:g} s: either no worker of this '
            'app is running, or none answered in time (paused, overloaded or cut '
            'off from the broker). Try a longer --timeout.'
        )
    if expected:
        return f'All {len(answered)} workers asked answered: {", ".join(answered)}.'
    return (
        f'{len(answered)} worker(s) answered within {timeout:g} s: '
        f'{", ".join(answered)}. A worker that did not answer in time is not '
        'listed, nor are its jobs; name the workers you expect with '
        '--destination to have any silent one named.'
    )


def jobs_table(held: list[dict[str, Any]], now: float) -> list[str]:
    """The lines of the ``jobs`` table, header first."""
    rows = [('JOB', 'TASK', 'OWNER', 'ATTEMPT', 'AGE', 'PROGRESS', 'PROVEN')]
    for job in held:
        proven = job.get('proven')
        rows.append((
            job['id'], job['task'], job['owner'], str(job['attempt']),
            duration(now - job['started']) if job.get('started') else '-',
            progress_text(job.get('progress')) or job.get('state', ''),
            f'{duration(now - proven)} ago' if proven else 'not yet',
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append('  '.join(cells).rstrip())
    return lines


def progress_text(progress: Mapping[str, Any] | None) -> str:
    """A progress value in words with a text bar: ``[#####-----]  50% 4/8 note``."""
    if not progress:
        return ''
    done, total = progress.get('done'), progress.get('total')
    note = progress.get('note')
    if total:
        share = max(0.0, min(1.0, float(done or 0) / float(total)))
        filled = round(share * BAR_WIDTH)
        text = (f'[{"#" * filled}{"-" * (BAR_WIDTH - filled)}] {share:4.0%} '
                f'{_number(done)}/{_number(total)}')
    else:
        text = f'{_number(done)} done'
    return f'{text} {note}' if note else text


def duration(seconds: float) -> str:
    """Seconds as a short duration: ``0.4s``, ``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f'{seconds:.1f}s'
    if seconds < 60:
        return f'{seconds:.0f}s'
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f'{minutes}m{secs:02d}s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h{minutes:02d}m'


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@turnout.command()
@click.argument('job_id')
@JSON_OPTION
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show the timeline of a job: attempts, owners, takeovers, progress."""
    app: Celery = ctx.obj.app
    store = store_for(app)
    events = store.history(job_id)
    state, progress = _state(app, job_id), store.progress(job_id)
    checkpoint, cancelled = store.checkpoint(job_id), store.cancelled(job_id)
    if as_json:
        click.echo(json.dumps({
            'job': job_id, 'state': state, 'progress': progress,
            'checkpoint': checkpoint, 'cancelled': cancelled, 'history': events,
        }, indent=2, default=repr))
        return
    if not events:
        raise click.ClickException(no_record(job_id))
    start = events[0]['at']
    for event in events:
        click.echo(_line(event, start))
    now = time.time()
    click.echo(f'state: {state}{_pending_note(state, events)}')
    if progress:
        click.echo(f'progress: {progress_text(progress)} (attempt '
                   f'{progress.get("attempt")}, '
                   f'{duration(now - progress.get("at", now))} ago)')
    if checkpoint:
        size = len(json.dumps(checkpoint.get('state')))
        click.echo(f'checkpoint: {size} bytes of JSON saved by attempt '
                   f'{checkpoint.get("attempt")}, '
                   f'{duration(now - checkpoint.get("at", now))} ago')
    if cancelled:
        click.echo(f'cancelled: {cancelled}')


def no_record(job_id: str) -> str:
    """The message of ``show`` and ``watch`` for a job turnout knows nothing of."""
    return (
        f'turnout has no record of job {job_id}: no worker has admitted it. Check '
        'the id (and that this is the app that sent the job); a job that still '
        'waits in the broker queue has no record yet either, so try again once a '
        'worker has taken it.'
    )


def _line(event: dict[str, Any], start: float) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(event['at']))
    extra = ''.join(
        f' {key}={value}' for key, value in event.items()
        if key not in ('event', 'attempt', 'worker', 'at') and value is not None
    )
    return (
        f'{stamp} +{event["at"] - start:7.1f}s  attempt {event["attempt"]:<3} '
        f'{event["event"]:<11} on {event["worker"]}{extra}'
    )


#: History events after which no copy of the job runs.
ENDING_EVENTS = frozenset({'finished', 'failed', 'cancelled', 'revoked', 'refused'})


def _pending_note(state: str | None, events: list[dict[str, Any]]) -> str:
    """Why a job that turnout saw start is still PENDING in the backend."""
    if state != PENDING:
        return ''
    started = [e for e in events if e.get('event') == 'started']
    if not started or any(e.get('event') in ENDING_EVENTS for e in events):
        return ''
    last = started[-1]
    return (f' in the result backend, while attempt {last.get("attempt")} runs or '
            f'waits on {last.get("worker")} (Celery stores STARTED only for tasks '
            'with track_started=True)')


def _state(app: Celery, job_id: str) -> str | None:
    if isinstance(app.backend, DisabledBackend):
        return None
    return str(app.AsyncResult(job_id).state)


@turnout.command()
@click.argument('job_id')
@click.option('--timeout', type=float, default=None,
              help='Give up after this many seconds (exit status 2).')
@JSON_OPTION
@click.pass_context
def watch(ctx: click.Context, job_id: str, timeout: float | None,
          as_json: bool) -> None:
    """Follow a job's progress until it ends; exit 0 only if it succeeded.

    Exit status 1 when the job ended otherwise, 2 when --timeout passed first.
    """
    app: Celery = ctx.obj.app
    if isinstance(app.backend, DisabledBackend):
        raise click.ClickException('watch needs a result backend to see the outcome')
    store, backend = store_for(app), app.backend
    deadline = None if timeout is None else time.monotonic() + timeout
    live = sys.stdout.isatty() and not as_json
    last: str | None = None
    first = True
    while True:
        meta = backend.get_task_meta(job_id, cache=False)
        state, progress = str(meta.get('status')), store.progress(job_id)
        # The backend says PENDING for any id it does not know, and so for a
        # job that still waits in a queue: say which two it can be, once.
        if first and state == PENDING and not progress and not store.history(job_id):
            click.echo(
                f'turnout has no record of job {job_id} yet: either it still waits '
                'in a broker queue for a worker, or the id is wrong (or belongs to '
                'another app). Watching until it appears; --timeout bounds the wait.',
                err=True,
            )
        first = False
        update = watch_update(job_id, state, progress, meta.get('result'))
        text = json.dumps(update) if as_json else watch_line(update)
        if text != last:
            click.echo(('\r' + text.ljust(len(last or ''))) if live else text,
                       nl=not live)
            last = text
        if state in READY_STATES:
            if live:
                click.echo()
            ctx.exit(0 if state == SUCCESS else 1)
        if deadline is not None and time.monotonic() >= deadline:
            if live:
                click.echo()
            click.echo(f'job {job_id} did not end within {timeout:g} s', err=True)
            ctx.exit(2)
        time.sleep(WATCH_PERIOD)


def watch_update(
    job_id: str, state: str, progress: Mapping[str, Any] | None, info: Any,
) -> dict[str, Any]:
    """What ``watch`` shows at one moment: the state and the latest progress."""
    meta = info if isinstance(info, Mapping) else {}
    source = progress or meta
    update = {
        'job': job_id, 'state': state,
        'attempt': meta.get('attempt') or (progress or {}).get('attempt'),
        'done': source.get('done'), 'total': source.get('total'),
        'note': source.get('note'),
    }
    if state in READY_STATES and state != SUCCESS and info is not None:
        update['reason'] = str(info)
    return update


def watch_line(update: Mapping[str, Any]) -> str:
    """One line of ``watch``'s text output."""
    text = f'{update["state"]:<8}'
    if update.get('attempt'):
        text += f' attempt {update["attempt"]}'
    if update.get('done') is not None:
        text += '  ' + progress_text(update)
    if update.get('reason'):
        text += f'  {update["reason"]}'
    return text


@turnout.command()
@click.argument('job_id')
@click.option('--reason', default='cancelled from the command line',
              show_default=True, help='Why; stored as the REVOKED reason.')
@JSON_OPTION
@click.pass_context
def cancel(ctx: click.Context, job_id: str, reason: str, as_json: bool) -> None:
    """Cancel a job for good: stop its running copy and never run it again."""
    app: Celery = ctx.obj.app
    known = bool(store_for(app).history(job_id))
    stopped = cancel_job(app, job_id, reason)
    if as_json:
        click.echo(json.dumps({'job': job_id, 'reason': reason, 'stopped': stopped,
                               'known': known}))
    elif stopped and not known:
        click.echo(f'Cancelled job {job_id}: {reason}. No worker has admitted it '
                   'yet (it may still wait in a queue, or the id is wrong); no copy '
                   'of it will start.')
    elif stopped:
        click.echo(f'Cancelled job {job_id}: {reason}.')
    else:
        click.echo(f'Job {job_id} had already ended ({_state(app, job_id)}); it is '
                   'marked cancelled all the same.')
