"""Fault injection for tests: make a worker die at a named step of the protocol.

Off unless the environment variable ``TURNOUT_FAULT`` names a step, and meant for
test workers only. When a worker reaches that step it kills its main process with
SIGKILL (its pool processes die with it), exactly as a crash at that moment
would. The steps:

=========================== =====================================================
``admit.after_claim``       a job copy was claimed, the request not yet built
``tick.after_supervise``    the supervise message is out, the monitor message not
``tick.after_monitor``      the monitor message is out, the previous lane not purged
``tick.after_purge``        the previous lane is purged, new jobs not acknowledged
``check.after_fence``       a takeover sent the fence notice, re-dispatched nothing
``check.after_redispatch``  a takeover re-dispatched, the check is not completed
``finish.before_claim``     a job's outcome is stored, completion not yet claimed
``handoff.after_stop``      a leaving worker stopped its copies, re-dispatched none
``handoff.after_redispatch`` a leaving worker re-dispatched, its lanes not purged
=========================== =====================================================
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

#: The steps at which a fault can be injected.
POINTS = frozenset({
    'admit.after_claim', 'tick.after_supervise', 'tick.after_monitor',
    'tick.after_purge', 'check.after_fence', 'check.after_redispatch',
    'finish.before_claim', 'handoff.after_stop', 'handoff.after_redispatch',
})


def fault_point(name: str) -> None:
    """Kill this worker if ``TURNOUT_FAULT`` names this step."""
    if os.environ.get('TURNOUT_FAULT') != name:
        return
    logger.critical(
        'TURNOUT_FAULT=%s: killing this worker (pid %d) at this step, as a crash '
        'would. Never set TURNOUT_FAULT outside tests.', name, os.getpid(),
    )
    main = os.getppid() if name.startswith('finish.') else os.getpid()
    os.kill(main, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
