"""False takeovers while both cores are saturated by CPU-bound jobs.

On each broker, two workers (prefork, ``-c 2``) run CPU-bound turnout jobs
(``bench.spinner``, ``--job-seconds`` each) back to back for ``--minutes``,
at a 1 s supervise interval by default; the benchmark keeps a few jobs queued
so that every pool process spins all the time. The brokers run side by side,
so there are more busy processes than cores. No worker dies and none is
paused, so every takeover is a false one. Counted:

- ``takes over`` lines in the worker logs (one per takeover of an owner);
- jobs with a ``taken_over`` event in their history;
- start records of an attempt above 1 (a job that ran twice);
- checks that came more than half an interval late (``Checked monitor
  message ... late``), a sign of how close the run came to a false takeover.

The machine's load average and the share of CPU the workers got are printed
with the table, to show the cores were saturated.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    Broker,
    Cluster,
    add_source_option,
    brokers,
    install_cleanup,
    make_workdir,
    pin_turnout,
    process_cpu,
    table,
    versions,
)

#: Jobs kept waiting in the queue beyond those running.
BACKLOG = 4


def _pool_cpu(cluster: Cluster) -> float:
    total = 0.0
    for worker in cluster.live():
        total += process_cpu(worker.pid)
        path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
        try:
            children = path.read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            try:
                total += process_cpu(int(child))
            except FileNotFoundError:
                pass
    return total


def run_broker(
    broker: Broker, workdir: Path, interval: float, minutes: float,
    job_seconds: float, out: dict[str, Any],
) -> None:
    """Keep two workers' pools spinning for ``minutes``; count takeovers."""
    import celery_turnout

    cluster = Cluster(broker, workdir, interval, f"{broker.name}-spin")
    job_ids: list[str] = []
    try:
        workers = cluster.start(2, pool="prefork", concurrency=2)
        slots = sum(2 for _ in workers)
        cpu_before, started = _pool_cpu(cluster), time.monotonic()
        deadline = started + minutes * 60
        while time.monotonic() < deadline:
            now = time.time()
            # Queued, or spinning with time left; older jobs are done.
            in_flight = [
                j for j in job_ids[-4 * (slots + BACKLOG):]
                if (rec := cluster.started(j)) is None
                or rec["time"] + job_seconds > now
            ]
            for _ in range(slots + BACKLOG - len(in_flight)):
                if time.monotonic() + job_seconds > deadline:
                    break
                result = cluster.app.send_task("bench.spinner", args=(job_seconds,))
                job_ids.append(result.id)
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        cpu = _pool_cpu(cluster) - cpu_before
        time.sleep(2 * interval + 1)  # checks of the last ticks come due
        taken = 0
        for job_id in job_ids:
            events = celery_turnout.history(cluster.app, job_id)
            taken += any(e.get("event") == "taken_over" for e in events)
        reruns = sum(
            1 for j in job_ids
            if any((r["attempt"] or 1) > 1 for r in cluster.starts(j))
        )
        out.update(
            jobs=len(job_ids),
            started=sum(1 for j in job_ids if cluster.started(j)),
            log=len(cluster.grep_logs("takes over")),
            history=taken,
            reruns=reruns,
            late=len(cluster.grep_logs("Checked monitor message")),
            cores=cpu / elapsed,
        )
    except Exception as exc:
        out["error"] = repr(exc)
    finally:
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    """Parse the options, spin on every broker side by side, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis,rabbitmq,filesystem",
                        help="comma-separated, of redis,rabbitmq,filesystem")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="supervise interval in seconds")
    parser.add_argument("--job-seconds", type=float, default=20.0,
                        help="how long each CPU-bound job spins")
    add_source_option(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.brokers.split(",") if n]

    install_cleanup()
    workdir = make_workdir("spin")
    pin_turnout(args.turnout_ref, workdir)
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    with brokers(names, workdir) as found:
        print(versions(found["rabbitmq"].rabbit if "rabbitmq" in found else None))
        print("# " + " ".join(["nice -n 10 .venv/bin/python bench/false_takeovers.py",
                               *(argv if argv is not None else sys.argv[1:])]))
        threads = [
            threading.Thread(
                target=run_broker, daemon=True, name=name,
                args=(found[name], workdir, args.interval, args.minutes,
                      args.job_seconds, results[name]),
            )
            for name in names
        ]
        for thread in threads:
            thread.start()
        loads = []
        while any(t.is_alive() for t in threads):
            loads.append(os.getloadavg()[0])
            time.sleep(5)
    rows = []
    for name in names:
        r = results[name]
        rows.append([
            name, r.get("jobs", "-"), r.get("started", "-"), r.get("log", "-"),
            r.get("history", "-"), r.get("reruns", "-"), r.get("late", "-"),
            f"{r['cores']:.2f}" if "cores" in r else "-",
            "yes" if r.get("log") == 0 and r.get("history") == 0 else "no",
            r.get("error", ""),
        ])
    print()
    print(f"{args.minutes:g} min of CPU-bound jobs, interval {args.interval:g} s, "
          "2 workers x prefork -c 2 per broker, brokers side by side; load average "
          f"(1 min) median {sorted(loads)[len(loads) // 2] if loads else 0:.1f} "
          f"on {os.cpu_count()} cores")
    print()
    print(table(["broker", "jobs sent", "jobs started", "takeovers (log)",
                 "taken_over events", "ran twice", "late checks",
                 "cores used by its workers", "0 false takeovers", "error"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
