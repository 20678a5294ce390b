"""The ``turnout-jobs`` remote-control command.

``celery -A app inspect turnout-jobs`` asks every worker for the turnout jobs
it holds. The command is registered when this package is imported, which the
app module does in the CLI process as well as in the worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.control import inspect_command, nok, ok

from .supervision import supervisor_of

logger = logging.getLogger(__name__)


@inspect_command(name='turnout-jobs')  # type: ignore[untyped-decorator]
def turnout_jobs(state: Any) -> dict[str, Any]:
    """List the turnout jobs this worker holds: id, task, attempt, owner, times."""
    supervisor = supervisor_of(state.consumer.app)
    if supervisor is None:
        return nok('turnout supervision is not running on this worker')
    try:
        supervisor.progress_watch.refresh()
    except Exception as exc:
        logger.warning(
            'Worker %s lists its turnout jobs without fresh progress: the turnout '
            'store did not answer (%r).', supervisor.hostname, exc,
        )
    return ok([
        job.describe(supervisor.hostname, supervisor.proven_at)
        for job in supervisor.ledger.held()
    ])
