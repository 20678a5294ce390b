"""Jobs that report progress, save checkpoints and stall, for the integration tests.

They write the same JSON-line records as the jobs of ``app.py`` (``start``,
``step``, ``finish``), with extra fields: ``resumed_from`` on a start, ``step``
on each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from celery_turnout import turnout_task

#: Seconds between two looks at the clock while a job sleeps.
STEP = 0.05

#: Seconds of unmoving progress after which a stalling job counts as stalled.
STALL_TIMEOUT = 2.0

Record = Callable[..., None]


def register_progress_jobs(app: Celery, record: Record) -> None:
    """Register the jobs on ``app``; ``record(task, event, **fields)`` writes a line."""

    def nap(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(STEP)

    def outcome(task: Task, **fields: Any) -> dict[str, Any]:
        return {"job": task.request.id, "attempt": getattr(task, "attempt", None),
                "worker": task.request.hostname, **fields}

    def count(
        self: Task, steps: int, seconds: float, checkpoint: bool
    ) -> dict[str, Any]:
        state = (self.resume_state if checkpoint else None) or {"next": 0, "sum": 0}
        record(self, "start", resumed_from=state["next"])
        total = state["sum"]
        for step in range(state["next"], steps):
            nap(seconds)
            total += step
            record(self, "step", step=step)
            self.progress(step + 1, steps, note=f"step {step + 1} of {steps}")
            if checkpoint:
                self.checkpoint({"next": step + 1, "sum": total})
        record(self, "finish")
        return outcome(self, sum=total, resumed_from=state["next"])

    @turnout_task(app, name="it.counter", bind=True)
    def counter(
        self: Task, steps: int, seconds: float, checkpoint: bool = False
    ) -> dict[str, Any]:
        """Add up 0 .. steps-1, one step every ``seconds``, reporting progress.

        With ``checkpoint``, it saves ``{next, sum}`` after every step and a
        later attempt resumes from there, so no step is counted twice.
        """
        return count(self, steps, seconds, checkpoint)

    @turnout_task(app, name="it.fragile_counter", bind=True, max_takeovers=0)
    def fragile_counter(self: Task, steps: int, seconds: float) -> dict[str, Any]:
        """Count like ``it.counter``, but fail for good when its owner is lost."""
        return count(self, steps, seconds, False)

    @turnout_task(
        app, name="it.stall_restarter", bind=True, stall_timeout=STALL_TIMEOUT,
        on_stall="restart", max_takeovers=1,
    )
    def stall_restarter(self: Task, seconds: float) -> dict[str, Any]:
        """Stand still for ``seconds`` on the first attempt; finish at once after."""
        record(self, "start")
        self.progress(0, 1)
        if self.attempt == 1:
            nap(seconds)
        self.progress(1, 1)
        record(self, "finish")
        return outcome(self)

    @turnout_task(
        app, name="it.stall_failer", bind=True, stall_timeout=STALL_TIMEOUT,
        on_stall="fail",
    )
    def stall_failer(self: Task, seconds: float) -> dict[str, Any]:
        """Report progress once, then stand still for ``seconds``."""
        record(self, "start")
        self.progress(0, 1)
        nap(seconds)
        record(self, "finish")
        return outcome(self)
