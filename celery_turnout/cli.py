"""The ``celery turnout`` command."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from .store import store_for


@click.group(name='turnout')
@click.pass_context
def turnout(ctx: click.Context) -> None:
    """Watch and steer turnout jobs."""


@turnout.command()
@click.argument('job_id')
@click.option('--json', 'as_json', is_flag=True, help='Print JSON for scripts.')
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show the timeline of a job: attempts, owners, takeovers."""
    app = ctx.obj.app
    events = store_for(app).history(job_id)
    if as_json:
        click.echo(json.dumps(events, indent=2))
        return
    if not events:
        raise click.ClickException(f'no turnout history for job {job_id}')
    start = events[0]['at']
    for event in events:
        click.echo(_line(event, start))


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
