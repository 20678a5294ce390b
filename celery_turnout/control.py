"""The ``turnout-jobs`` remote-control command.

``celery -A app inspect turnout-jobs`` asks every worker for the turnout jobs
it holds. The command is registered when this package is imported, which the
app module does in the CLI process as well as in the worker.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command, nok, ok

from .supervision import supervisor_of


@inspect_command(name='turnout-jobs')  # type: ignore[untyped-decorator]
def turnout_jobs(state: Any) -> dict[str, Any]:
    """List the turnout jobs this worker holds: id, task, attempt, owner, times."""
    supervisor = supervisor_of(state.consumer.app)
    if supervisor is None:
        return nok('turnout supervision is not running on this worker')
    return ok([
        job.describe(supervisor.hostname, supervisor.proven_at)
        for job in supervisor.ledger.held()
    ])
