"""A minute of chaos on each real broker: no job lost, no unfenced copies.

The short version of ``scripts/chaos``, run by the same code (the ``chaos``
package at the repository root): three workers, twenty jobs of 2 to 15 s, and
a minute of random SIGKILLs, pauses and SIGTERMs. ``chaos.analysis`` defines
what counts as lost and as an unfenced overlap.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos.analysis import analyze  # noqa: E402
from chaos.run import ChaosConfig, run_chaos  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.transports("redis", "rabbitmq")]

#: Minutes of chaos; with the start and the drain a run takes under 2 minutes.
MINUTES = 1.0
#: Seconds the jobs get to finish once the chaos stopped.
DRAIN_SECONDS = 40.0


def test_a_minute_of_chaos_loses_no_job_and_runs_no_unfenced_copies(
    broker: Any, tmp_path: Path, figure: Callable[[str], None]
) -> None:
    seed = random.randrange(10**6)
    config = ChaosConfig(
        broker=broker.name, minutes=MINUTES, jobs=20, workers=3, concurrency=2,
        shortest=2.0, longest=15.0, drain_seconds=DRAIN_SECONDS, seed=seed,
    )  # fmt: skip
    began = time.monotonic()
    directory = run_chaos(
        config, tmp_path / "chaos", command=f"test_chaos[{broker.name}] seed {seed}"
    )
    report = analyze(directory)
    took = time.monotonic() - began
    text = "\n".join(report.lines())
    print(text)

    figure(
        f"{broker.name} chaos (seed {seed}): {report.completed}/{report.submitted} "
        f"completed, {len(report.lost)} lost, {len(report.held)} held unstarted "
        f"at the deadline, {len(report.unfenced)} unfenced "
        f"overlaps, {len(report.takeovers)} takeovers "
        f"({len(report.false_takeovers)} false), run took {took:.0f} s"
    )
    assert not report.lost, text
    assert not report.unfenced, text
