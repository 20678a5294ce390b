"""Reproduce the job loss the Redis chaos run found: a BRPOP reply dies unread.

``python -m chaos.brpop_loss`` starts one worker on Redis (database 5, as the
chaos run), waits until it idles in its BRPOP, pauses its process group, sends
one job, SIGKILLs the worker and starts another. Redis handed the job to the
paused worker's outstanding BRPOP, which removed it from the queue; kombu puts
a message into its ``unacked`` hash only once the worker reads the reply, so
the job is in neither place, and the live worker never gets it. The script
prints what it saw and exits 1 if the job was lost. The pause only makes the
window wide: a worker killed while its reply is in flight loses it as well.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .source import ROOT, use

#: Seconds the live worker gets to run the job.
WAIT = 25.0


def main() -> int:
    """Run the reproduction once; return 1 if the job was lost, else 0."""
    use(ROOT)
    import redis

    from . import TASK_NAME
    from .run import ChaosConfig, broker_env
    from .workers import ChaosCluster

    directory = Path(tempfile.mkdtemp(prefix="turnout-brpop-"))
    token = uuid.uuid4().hex[:8]
    config = ChaosConfig(broker="redis", minutes=0, jobs=1)
    env = broker_env(config, token, directory / "records", ROOT)
    cluster = ChaosCluster("redis", env, directory, token)
    broker = redis.Redis.from_url(env["TURNOUT_IT_BROKER_URL"])
    queue = env["TURNOUT_IT_TASK_QUEUE"]
    try:
        first = cluster.spawn(1)
        cluster.wait_ready(first)
        time.sleep(2.0)  # idle: its consumer waits in BRPOP
        os.killpg(first.pid, signal.SIGSTOP)
        job = cluster.send(TASK_NAME, 2.0)
        time.sleep(1.0)
        left = broker.llen(queue)
        unacked = [
            tag for tag, raw in broker.hgetall("unacked").items()
            if job.id.encode() in raw
        ]
        os.killpg(first.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        second = cluster.spawn(1)
        cluster.wait_ready(second)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and job.state != "SUCCESS":
            time.sleep(0.5)
        state = job.state
    finally:
        cluster.destroy()
    lost = state != "SUCCESS"
    sys.stdout.write(
        f"job {job.id}: sent while {first.name} was paused in BRPOP; queue "
        f"length then {left}, in kombu's unacked hash: {bool(unacked)}; after "
        f"SIGKILL and {WAIT:.0f} s with a live worker: {state} "
        f"({'LOST' if lost else 'not lost'}); logs in {directory}\n"
    )
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
