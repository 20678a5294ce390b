"""Jobs that kill the process running them, for the poison-pill tests."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from celery_turnout import turnout_task

#: Takeovers the worker-killing jobs allow before they fail for good.
POISON_TAKEOVERS = 2


def register_poison_jobs(app: Celery, record: Callable[..., None]) -> None:
    """Register the poison jobs on ``app``; ``record`` writes their events."""

    @turnout_task(app, name="it.kills_its_pool_process_once", bind=True)
    def kills_its_pool_process_once(self: Task) -> dict[str, Any]:
        """Die with the pool process on the first attempt, then succeed."""
        record(self, "start")
        if self.attempt == 1:
            os._exit(1)
        time.sleep(0.5)
        record(self, "finish")
        return {"attempt": self.attempt, "worker": self.request.hostname}

    @turnout_task(
        app, name="it.kills_its_pool_process", bind=True,
        max_takeovers=POISON_TAKEOVERS,
    )  # fmt: skip
    def kills_its_pool_process(self: Task) -> None:
        """Die with the pool process on every attempt, as an OOM kill would."""
        record(self, "start")
        os._exit(1)

    @turnout_task(
        app, name="it.kills_its_worker", bind=True, max_takeovers=POISON_TAKEOVERS,
    )  # fmt: skip
    def kills_its_worker(self: Task) -> None:
        """Kill the worker's main process on every attempt, once supervised.

        It waits two ticks first: a worker that dies before its first tick
        covers a job leaves the job to the broker's redelivery, which the
        filesystem transport does not do (a limit the README states).
        """
        record(self, "start")
        time.sleep(2 * float(app.conf.turnout_supervise_interval))
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
