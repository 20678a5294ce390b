"""Run ``celery`` with the main thread of the main process under cProfile.

``python profiled_worker.py -A benchapp worker ...`` behaves like ``celery``
and, when the process exits, writes the profile to ``$BENCH_PROFILE``. Pool
processes forked from it switch the inherited profiler off at once.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import sys
from typing import Any

from celery.__main__ import main
from celery.signals import worker_process_init

profiler = cProfile.Profile()


@worker_process_init.connect(weak=False)
def _not_in_children(**_: Any) -> None:
    profiler.disable()


def _dump() -> None:
    profiler.disable()
    if os.environ.get("BENCH_PROFILE"):
        profiler.dump_stats(os.environ["BENCH_PROFILE"])


if __name__ == "__main__":
    atexit.register(_dump)
    sys.argv[0] = "celery"
    profiler.enable()
    main()
