"""The example project's Celery app and its one long-running job."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task

from celery_turnout import turnout_task
from example_project.ledger import Audit, read_ledger
from example_project.settings import chunk_delay, configure

logger = logging.getLogger(__name__)

#: Rows of the customer's history read between two pauses of the job.
CHUNK_ROWS = 2_000

#: How many chunks go by between two progress lines in the worker's log.
CHUNKS_PER_LOG_LINE = 5


app = Celery('example_project')
configure(app)


#: Takeovers a job may go through before it fails for good.
MAX_TAKEOVERS = 3


@turnout_task(app, bind=True, name='example_project.audit_customer_history',
              max_takeovers=MAX_TAKEOVERS)
def audit_customer_history(self: Task, path: str, customer: str) -> dict[str, Any]:
    """Audit one customer's history in the ledger, slowly, chunk by chunk.

    After each chunk the job reports its progress and saves a checkpoint; an attempt
    that takes the job over resumes from the last checkpoint instead of row 1.

    Args:
        self: The running job, bound to this call.
        path: The ledger's CSV file, readable by every worker.
        customer: The customer to audit.

    Returns:
        The audit's summary, see `example_project.ledger.Audit.summary`.
    """
    job_id, worker = self.request.id, self.request.hostname
    attempt = self.attempt
    total = sum(1 for _ in read_ledger(Path(path), customer))
    delay = chunk_delay()

    rows = read_ledger(Path(path), customer)
    checkpoint = self.resume_state
    if checkpoint is None:
        audit, note = Audit(customer), customer
    else:
        done = itertools.islice(rows, checkpoint['audit']['rows'])
        audit = Audit.resume(customer, checkpoint['audit'], done)
        note = f'{customer}, resumed at row {audit.rows + 1}'
    logger.info(
        'Job %s (attempt %d on %s) starts auditing %d rows of %r at row %d.',
        job_id, attempt, worker, total, customer, audit.rows + 1,
    )
    self.progress(audit.rows, total, note=note)

    for number in itertools.count(1):
        chunk = list(itertools.islice(rows, CHUNK_ROWS))
        if not chunk:
            break
        audit.feed(chunk)
        # Progress first: the checkpoint saves the latest progress with it.
        self.progress(audit.rows, total, note=note)
        self.checkpoint({'audit': audit.state()})
        if number % CHUNKS_PER_LOG_LINE == 0:
            logger.info(
                'Job %s (attempt %d on %s) has read %d of %d rows of %r.',
                job_id, attempt, worker, audit.rows, total, customer,
            )
        time.sleep(delay)

    summary = audit.summary()
    logger.info(
        'Job %s (attempt %d on %s) finished: %d rows, %d anomalies in %r.',
        job_id, attempt, worker, summary['rows'], len(summary['anomalies']), customer,
    )
    return summary
