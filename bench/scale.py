"""Scale: the most supervised jobs two workers hold with no false takeover.

Two workers (``-P threads``, one thread per job) share sleeping turnout jobs.
The ramp tries each size of ``--sizes`` in turn on fresh workers: it sends
the jobs, waits until supervise ticks cover all of them, holds them for
``--step-intervals`` intervals and fails the size if any worker took a job
over (no worker dies here, so every takeover is false) or the jobs were not
covered in time. The largest size that passed is then held on fresh workers
for ``--minutes`` (if it fails there, the next smaller passing size, up to
``--hold-tries`` sizes); the table gives the takeovers seen, the broker traffic and
the CPU time of both workers' main processes per interval at that size, next
to the same two workers holding no job.

False takeovers are counted three ways: ``takes over`` lines in the worker
logs, ``Re-dispatched job`` lines, and ``taken_over`` events in the history
that ``celery_turnout.history`` returns for each job.
"""

from __future__ import annotations

import argparse
import sys
import time
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
from supervision_cost import costs, snapshot


def count_takeovers(cluster: Cluster, job_ids: list[str]) -> dict[str, Any]:
    """Takeovers seen in the logs and in the jobs' histories.

    Call it once the workers are gone: a store they overloaded answers again.
    """
    import celery_turnout

    counts: dict[str, Any] = {
        "log": len(cluster.grep_logs("takes over")),
        "redispatched": len(cluster.grep_logs("Re-dispatched job")),
        "late_checks": len(cluster.grep_logs("Checked monitor message")),
        "store_errors": len(cluster.grep_logs("MaxClientsReachedError")),
    }
    in_history = 0
    try:
        for job_id in job_ids:
            events = celery_turnout.history(cluster.app, job_id)
            in_history += sum(1 for e in events if e.get("event") == "taken_over")
    except Exception as exc:  # report it; the log counts still stand
        counts["error"] = f"history unreadable: {exc!r}"
    counts["history"] = in_history
    return counts


def hold(
    broker: Broker, workdir: Path, interval: float, jobs: int, seconds: float,
    label: str, measure: bool,
) -> dict[str, Any]:
    """Hold ``jobs`` jobs on two fresh workers for ``seconds``; report what happened.

    Returns a dict with ``ok``, the takeover counts, the seconds the jobs took
    to be covered, and (with ``measure``) per-interval costs while held.
    """
    cluster = Cluster(broker, workdir, interval, label)
    per_worker = max(1, jobs)
    result: dict[str, Any] = {"jobs": jobs, "ok": False}
    job_ids: list[str] = []
    try:
        workers = cluster.start(2, pool="threads", concurrency=per_worker)
        pids = [w.pid for w in workers]
        lifetime = seconds + 10 * interval + 300
        sent_at = time.monotonic()
        job_ids = [
            cluster.app.send_task("bench.napper", args=(lifetime,)).id
            for _ in range(jobs)
        ]

        def covered() -> bool:
            return sum(covered_jobs(w.log()) for w in workers) >= jobs

        try:
            wait_for(covered, 120 + 5 * interval, f"{jobs} jobs to be covered", 0.5)
        except TimeoutError as exc:
            result["error"] = str(exc)
            cluster.destroy()
            result.update(count_takeovers(cluster, job_ids))
            return result
        result["cover_s"] = time.monotonic() - sent_at
        result["split"] = "/".join(str(covered_jobs(w.log())) for w in workers)
        time.sleep(2 * interval)
        before = snapshot(broker, *pids)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not all(w.alive() for w in workers):
                result["error"] = "a worker died"
                break
            if cluster.grep_logs("takes over"):
                break  # one false takeover decides the size
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        after = snapshot(broker, *pids)
        if measure:
            result.update(costs(before, after, interval))
        cluster.destroy()
        result.update(count_takeovers(cluster, job_ids))
        result["ok"] = "error" not in result and result["log"] == 0 and (
            result["history"] == 0
        )
        return result
    finally:
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    """Parse the options, ramp up, hold the largest size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis,rabbitmq",
                        help="comma-separated, of redis,rabbitmq")
    parser.add_argument("--sizes", default="1000,2000,4000,8000",
                        help="total jobs of the ramp's steps, ascending")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="supervise interval in seconds")
    parser.add_argument("--step-intervals", type=int, default=15,
                        help="intervals each ramp step holds its jobs")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long the largest passing size is held")
    parser.add_argument("--hold-tries", type=int, default=2,
                        help="passing sizes tried, largest first, until one "
                        "holds for --minutes")
    add_source_option(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.brokers.split(",") if n]
    sizes = [int(n) for n in args.sizes.split(",") if n]

    install_cleanup()
    workdir = make_workdir("scale")
    pin_turnout(args.turnout_ref, workdir)
    rows: list[list[Any]] = []
    ramp_rows: list[list[Any]] = []
    with brokers(names, workdir) as found:
        print(versions(found["rabbitmq"].rabbit if "rabbitmq" in found else None))
        print("# " + " ".join(["nice -n 10 .venv/bin/python bench/scale.py",
                               *(argv if argv is not None else sys.argv[1:])]))
        for name in names:
            broker = found[name]
            passed: list[int] = []
            for size in sizes:
                step = hold(broker, workdir, args.interval, size,
                            args.step_intervals * args.interval,
                            f"{name}-ramp{size}", measure=False)
                print(f"[{name}] ramp {size}: {step}", flush=True)
                ramp_rows.append([
                    name, size, "pass" if step["ok"] else "FAIL",
                    f"{step.get('cover_s', float('nan')):.1f}",
                    step.get("split", "-"), step.get("log", "-"),
                    step.get("history", "-"), step.get("late_checks", "-"),
                    step.get("store_errors", "-"), step.get("error", ""),
                ])
                if not step["ok"]:
                    break
                passed.append(size)
            if not passed:
                continue
            idle = hold(broker, workdir, args.interval, 0, 20 * args.interval,
                        f"{name}-idle", measure=True)
            held = [idle]
            # A size that passed the short step can still fail the long hold:
            # then try the next smaller one, at most --hold-tries sizes.
            for size in reversed(passed[-args.hold_tries:]):
                final = hold(broker, workdir, args.interval, size,
                             args.minutes * 60, f"{name}-hold{size}", measure=True)
                print(f"[{name}] hold {size}: {final}", flush=True)
                held.append(final)
                if final["ok"]:
                    break
            for r in held:
                total = sum(r.get("redis", {}).values())
                rabbit = r.get("rabbit", {})
                sockets = r.get("sockets", {})
                kb = (
                    (sockets.get("recv_oct", 0) + sockets.get("send_oct", 0)) / 1000
                    if name == "rabbitmq" else r.get("redis_kb", float("nan"))
                )
                rows.append([
                    name, r["jobs"],
                    "idle" if r is idle else f"{args.minutes:g} min"
                    + ("" if r["ok"] else " FAILED"),
                    r.get("log", "-"), r.get("history", "-"),
                    r.get("late_checks", "-"),
                    f"{r.get('cpu_ms', float('nan')):.1f}", f"{total:.1f}",
                    f"{kb:.1f}",
                    f"{rabbit.get('messages_received_total', 0.0):.1f}"
                    if name == "rabbitmq" else "-",
                    r.get("error", ""),
                ])
    print()
    print(f"Ramp: two workers -P threads, interval {args.interval:g} s, each step "
          f"held {args.step_intervals} intervals")
    print()
    print(table(["broker", "jobs", "result", "covered after s", "jobs per worker",
                 "takeovers (log)", "taken_over events", "late checks",
                 "MaxClients errors", "error"], ramp_rows))
    print()
    print("Hold of the largest passing size, and the same two workers idle; costs "
          "per interval, both workers")
    print()
    print(table(["broker", "jobs", "held", "takeovers (log)", "taken_over events",
                 "late checks", "main CPU ms", "Redis cmds", "broker kB in+out",
                 "AMQP published",
                 "error"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
