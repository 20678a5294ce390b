"""Supervision cost: broker traffic and worker CPU per interval, by jobs held.

One worker (``-P threads -c 1000``) holds 0, 1, 10, 100 and 1000 sleeping
turnout jobs (each sleeps in a single call, so the jobs themselves cost no
CPU). Once every job is covered by a supervise tick, the benchmark reads the
broker's counters and the worker's CPU time, waits ``--window`` intervals,
reads them again, and reports the differences per interval. The row with 0
jobs is the idle worker: Celery's own polling and heartbeats.

What is counted, on private servers that serve this run alone:

- Redis broker: calls of every command (``INFO commandstats``) on the Redis
  server that is broker, result backend and turnout store at once.
- RabbitMQ broker: the node's global message counters (``rabbitmqctl eval
  rabbit_global_counters:overview()``: published, delivered, ``basic.get``
  that found nothing, acknowledged) and the reads of client sockets (the
  ``recv_cnt`` of ``rabbitmqctl list_connections``, which also sees queue
  declares and purges), plus the commands on the Redis that holds the store.
- CPU: user plus system time of the worker's main process from
  ``/proc/PID/stat``, all threads (the supervision thread is one of them).

Each job count gets a fresh worker, queue and turnout prefix.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import (
    Broker,
    Cluster,
    add_source_option,
    brokers,
    covered_jobs,
    install_cleanup,
    make_workdir,
    pin_turnout,
    table,
    versions,
    wait_for,
)

#: Commands the benchmark itself sends to read the counters.
OWN_COMMANDS = ("info", "ping", "hello", "client|setinfo", "client|setname")

#: Counters shown for RabbitMQ, with their column names.
RABBIT_COLUMNS = {
    "messages_received_total": "published",
    "messages_delivered_total": "delivered",
    "messages_get_empty_total": "get empty",
    "messages_acknowledged_total": "acked",
}


def snapshot(broker: Broker, *pids: int) -> dict[str, Any]:
    """Read every counter this benchmark compares, and the workers' CPU time."""
    from common import process_cpu

    assert broker.redis is not None
    taken: dict[str, Any] = {
        "time": time.monotonic(),
        "cpu": sum(process_cpu(pid) for pid in pids),
        "redis": broker.redis.commandstats(),
        "redis_bytes": broker.redis.net_bytes(),
    }
    if broker.rabbit is not None:
        taken["rabbit"] = broker.rabbit.counters()
        taken["sockets"] = broker.rabbit.connection_counters()
    return taken


def costs(before: Mapping[str, Any], after: Mapping[str, Any], interval: float,
          ) -> dict[str, Any]:
    """Per-interval differences between two snapshots."""
    periods = (after["time"] - before["time"]) / interval
    commands = _delta(after["redis"], before["redis"])
    for own in OWN_COMMANDS:
        commands.pop(own, None)
    result: dict[str, Any] = {
        "cpu_ms": 1000 * (after["cpu"] - before["cpu"]) / periods,
        "redis": {k: v / periods for k, v in commands.items()},
        "redis_kb": (after["redis_bytes"] - before["redis_bytes"]) / periods / 1000,
    }
    for key in ("rabbit", "sockets"):
        if key in after:
            result[key] = {
                k: v / periods for k, v in _delta(after[key], before[key]).items()
            }
    return result


def _delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def measure(
    broker: Broker, workdir: Path, interval: float, jobs: int, window: int,
    concurrency: int,
) -> dict[str, Any]:
    """Hold ``jobs`` sleeping jobs on one worker; return per-interval costs."""
    cluster = Cluster(broker, workdir, interval, f"{broker.name}-{jobs}")
    try:
        (worker,) = cluster.start(1, pool="threads", concurrency=concurrency)
        hold = 10 * interval + window * interval + 60
        for _ in range(jobs):
            cluster.app.send_task("bench.napper", args=(hold,))

        def covered() -> bool:
            return covered_jobs(worker.log()) >= jobs

        wait_for(covered, 60 + 5 * interval, f"{jobs} jobs to be covered", 0.2)
        time.sleep(2 * interval)  # the acknowledgements and first checks settle
        before = snapshot(broker, worker.pid)
        time.sleep(window * interval)
        after = snapshot(broker, worker.pid)
        if not worker.alive():
            raise RuntimeError(f"worker died; see {worker.log_path}")
        result = {"jobs": jobs, **costs(before, after, interval)}
        takeovers = cluster.grep_logs("takes over")
        result["takeovers"] = len(takeovers)
        return result
    finally:
        cluster.destroy()


def _top(counts: Mapping[str, float], n: int = 5) -> str:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v:.1f}" for k, v in ranked if v >= 0.05) or "-"


def report(name: str, results: list[dict[str, Any]], interval: float) -> str:
    """The table of one broker."""
    idle = results[0] if results and results[0]["jobs"] == 0 else None
    rows = []
    for r in results:
        total = sum(r["redis"].values())
        extra = total - sum(idle["redis"].values()) if idle else float("nan")
        cpu_extra = r["cpu_ms"] - idle["cpu_ms"] if idle else float("nan")
        row: list[Any] = [r["jobs"]]
        if name == "rabbitmq":
            rabbit = r.get("rabbit", {})
            row += [f"{rabbit.get(k, 0.0):.1f}" for k in RABBIT_COLUMNS]
            sockets = r.get("sockets", {})
            row.append(f"{sockets.get('recv_cnt', 0.0):.1f}")
            kb = (sockets.get("recv_oct", 0.0) + sockets.get("send_oct", 0.0)) / 1000
            row.append(f"{kb:.1f}")
            row.append(f"{total:.1f}")
        else:
            row += [f"{total:.1f}", f"{extra:+.1f}", f"{r['redis_kb']:.1f}"]
        row += [_top(r["redis"]), f"{r['cpu_ms']:.1f}", f"{cpu_extra:+.1f}",
                r["takeovers"]]
        rows.append(row)
    if name == "rabbitmq":
        headers = ["jobs", *RABBIT_COLUMNS.values(), "socket reads",
                   "AMQP kB in+out", "store Redis cmds", "store Redis top commands"]
    else:
        headers = ["jobs", "Redis cmds", "minus idle", "Redis kB in+out",
                   "top commands"]
    headers += ["CPU ms", "minus idle", "takeovers"]
    return "\n".join([
        f"{name}: per supervise interval ({interval:g} s), one worker "
        "-P threads",
        "",
        table(headers, rows),
    ])


def main(argv: list[str] | None = None) -> int:
    """Parse the options, measure every job count on every broker, print tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis,rabbitmq",
                        help="comma-separated, of redis,rabbitmq,filesystem")
    parser.add_argument("--jobs", default="0,1,10,100,1000",
                        help="job counts, comma-separated (0: idle worker)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="supervise interval in seconds")
    parser.add_argument("--window", type=int, default=20,
                        help="intervals measured per job count")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="threads of the worker's pool (-c)")
    add_source_option(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.brokers.split(",") if n]
    counts = [int(n) for n in args.jobs.split(",") if n]
    if max(counts) > args.concurrency:
        parser.error("--concurrency must be at least the largest job count")

    install_cleanup()
    workdir = make_workdir("cost")
    pin_turnout(args.turnout_ref, workdir)
    with brokers(names, workdir) as found:
        print(versions(found["rabbitmq"].rabbit if "rabbitmq" in found else None))
        print("# " + " ".join(["nice -n 10 .venv/bin/python bench/supervision_cost.py",
                               *(argv if argv is not None else sys.argv[1:])]))
        tables = []
        for name in names:
            results = []
            for jobs in counts:
                result = measure(found[name], workdir, args.interval, jobs,
                                 args.window, args.concurrency)
                print(f"[{name}] {jobs} jobs: {result}", flush=True)
                results.append(result)
            tables.append(report(name, results, args.interval))
    print()
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
