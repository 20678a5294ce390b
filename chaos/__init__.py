"""A chaos run for celery-turnout: random kills, pauses and shutdowns of workers.

``scripts/chaos --broker redis --minutes 5 --jobs 200 --workers 3`` starts real
``celery worker`` processes of the integration-test app (``tests/integration``),
submits jobs of mixed length and, for the given minutes, SIGKILLs, SIGSTOPs then
SIGCONTs, and SIGTERMs workers at random moments, restarting each one that died.
When the chaos stops, every job is given a bounded time to finish, and the run
prints what it saw: lost jobs, jobs completed more than once, concurrent copies
of one job and whether each overlap was fenced, false takeovers and takeover
latency. ``chaos.analysis`` documents every rule.

Modules:

- ``chaos.jobs``: the job the workers run (imported by the workers only).
- ``chaos.source``: the frozen copy of the code that a run's workers import.
- ``chaos.workers``: the cluster of worker processes and the watch on their pids.
- ``chaos.monkey``: the random disruptions and the restarts.
- ``chaos.run``: one whole run, from the first worker to the saved data.
- ``chaos.analysis``: the figures, computed from the saved data.
"""

from __future__ import annotations

#: The name of the chaos job; ``chaos.jobs`` registers it in the workers.
TASK_NAME = "chaos.sleeper"

#: Takeovers one chaos job may go through before it is given up: far more than
#: any run inflicts, so that a job that ends FAILURE points at a real problem.
MAX_TAKEOVERS = 1000
