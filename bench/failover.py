"""Failover time: SIGKILL the owner of a running job, time the job's next start.

Each trial sends one sleeping job to a cluster of three workers (prefork, two
pool processes each), waits until the job runs (and, for turnout, until a
supervise tick covered it), waits a random part of one interval so that kills
fall on every phase of the tick cycle, SIGKILLs the worker that runs it, and
measures until the job's start record shows it executing again on another
worker. The killed worker is then replaced; the next kill waits until every
worker has been up for one detection bound, so each kill meets a steady cluster.

Besides turnout at each interval and broker, the same run measures what a
Celery user has today on the same broker:

- ``late``: a plain ``acks_late`` task. On Redis the message comes back only
  after ``visibility_timeout`` (set short here, and the restore sweep set to
  run every second so that the timeout alone decides); on RabbitMQ it comes
  back as soon as the dead worker's connection closes.
- ``early``: a plain task with early acknowledgement (Celery's default): the
  job is lost; a trial counts it lost when it did not start again within
  ``--lost-after`` seconds.

Scenarios run in parallel threads (``--parallel``), each on its own queue and
turnout prefix, against private Redis and RabbitMQ servers started for the run.

Run ``nice -n 10 .venv/bin/python bench/failover.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BROKERS,
    Broker,
    Cluster,
    Worker,
    add_source_option,
    brokers,
    install_cleanup,
    make_workdir,
    percentile,
    pin_turnout,
    table,
    versions,
    wait_for,
)

#: Workers per scenario; one is killed per trial and then replaced.
WORKERS = 3

_stop = threading.Event()
_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print a progress line from any thread."""
    with _print_lock:
        print(text, flush=True)


@dataclass
class Scenario:
    """One broker, one way of running the job, one interval; its trials' results."""

    broker: str
    mode: str  # 'turnout', 'late' or 'early'
    interval: float
    trials: int
    lost_after: float
    delays: list[float] = field(default_factory=list)
    lost: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """A short name for logs and folders."""
        interval = f"-{self.interval:g}s" if self.mode == "turnout" else ""
        return f"{self.broker}-{self.mode}{interval}"


def run_scenario(
    scenario: Scenario, broker: Broker, workdir: Path, visibility_timeout: float,
) -> None:
    """Run every trial of one scenario, filling in its results."""
    extra_env: dict[str, str] = {}
    if scenario.mode == "late" and scenario.broker == "redis":
        options = dict(broker.transport_options)
        options.update(
            visibility_timeout=visibility_timeout,
            unacked_restore_interval=1,
            unacked_restore_throttle=1,
        )
        extra_env["BENCH_TRANSPORT_OPTIONS"] = json.dumps(options)
    cluster = Cluster(broker, workdir, scenario.interval, scenario.label, extra_env)
    ready_at: dict[str, float] = {}
    try:
        for worker in cluster.start(WORKERS):
            ready_at[worker.name] = time.monotonic()
        for number in range(1, scenario.trials + 1):
            if _stop.is_set():
                return
            try:
                delay = trial(scenario, cluster, ready_at)
            except Exception as exc:  # one failed trial must not hide the others
                scenario.errors.append(f"trial {number}: {exc!r}")
                say(f"[{scenario.label}] trial {number} failed: {exc!r}")
                traceback.print_exc()
                continue
            if delay is None:
                scenario.lost += 1
                say(f"[{scenario.label}] trial {number}: lost")
            else:
                scenario.delays.append(delay)
                say(f"[{scenario.label}] trial {number}: {delay:.3f} s")
    finally:
        cluster.destroy()


def trial(
    scenario: Scenario, cluster: Cluster, ready_at: dict[str, float],
) -> float | None:
    """Kill the owner of one running job; return the delay to its next start."""
    import celery_turnout

    interval = scenario.interval
    bound = 1.5 * interval
    # Replace the workers killed so far, and let every worker settle.
    while len(cluster.live()) < WORKERS:
        worker = cluster.spawn()
        cluster.wait_ready(worker)
        ready_at[worker.name] = time.monotonic()
    settle = max(ready_at[w.name] for w in cluster.live()) + bound + 0.5
    time.sleep(max(0.0, settle - time.monotonic()))

    task = {"turnout": "bench.sleeper", "late": "bench.late_sleeper",
            "early": "bench.early_sleeper"}[scenario.mode]
    job_id = cluster.app.send_task(task, args=(600.0,)).id
    try:
        first = wait_for(lambda: cluster.started(job_id), 30, f"job {job_id} to start")
        if scenario.mode == "turnout":
            wait_for(
                lambda: any(
                    e["event"] == "covered"
                    for e in celery_turnout.history(cluster.app, job_id)
                ),
                3 * interval + 10, f"job {job_id} to be covered", poll=0.01,
            )
            time.sleep(random.uniform(0.0, interval))
        else:
            time.sleep(random.uniform(0.0, 1.0))
        owner: Worker = cluster.by_name(first["worker"])
        killed_at = owner.kill()
        owner.process.wait(timeout=10)

        def restarted() -> dict[str, Any] | None:
            for record in cluster.starts(job_id)[1:]:
                if record["worker"] != owner.name:
                    return record
            return None

        timeout = scenario.lost_after
        try:
            second = wait_for(restarted, timeout, f"job {job_id} to restart", 0.01)
        except TimeoutError:
            if scenario.mode == "early":
                return None
            raise
        return float(second["time"]) - killed_at
    finally:
        cluster.stop_job(job_id)


def summarize(scenarios: list[Scenario], visibility_timeout: float) -> str:
    """The result tables: turnout, then the baselines with ratios to turnout."""
    rows = []
    turnout: dict[tuple[str, float], Scenario] = {}
    for s in scenarios:
        if s.mode != "turnout":
            continue
        turnout[(s.broker, s.interval)] = s
        if not s.delays:
            rows.append([s.broker, f"{s.interval:g}", 0, s.lost, "-", "-", "-",
                         "-", "-", "-", "no data"])
            continue
        p50, p95 = percentile(s.delays, 0.5), percentile(s.delays, 0.95)
        top = max(s.delays)
        met = "yes" if p95 <= 1.5 * s.interval else (
            f"no (+{p95 / s.interval - 1.5:.2f} I)"
        )
        rows.append([
            s.broker, f"{s.interval:g}", len(s.delays), s.lost + len(s.errors),
            f"{p50:.2f}", f"{p95:.2f}", f"{top:.2f}",
            f"{p50 / s.interval:.2f}", f"{p95 / s.interval:.2f}",
            f"{top / s.interval:.2f}", met,
        ])
    out = [
        "SIGKILL of a job's owner to the job executing again on another worker "
        "(turnout)",
        "",
        table(["broker", "interval s", "trials", "failed", "p50 s", "p95 s",
               "max s", "p50/I", "p95/I", "max/I", "p95 <= 1.5 I"], rows),
    ]

    base_rows = []
    for s in scenarios:
        if s.mode == "turnout":
            continue
        what = (
            f"acks_late, visibility_timeout {visibility_timeout:g} s"
            if s.mode == "late" and s.broker == "redis"
            else "acks_late" if s.mode == "late" else "early ack (default)"
        )
        if not s.delays:
            p50_text = p95_text = max_text = "-"
            ratios = "-"
        else:
            p50 = percentile(s.delays, 0.5)
            p50_text = f"{p50:.2f}"
            p95_text = f"{percentile(s.delays, 0.95):.2f}"
            max_text = f"{max(s.delays):.2f}"
            parts = []
            for (broker, interval), t in sorted(turnout.items()):
                if broker == s.broker and t.delays:
                    ratio = p50 / percentile(t.delays, 0.5)
                    parts.append(f"{ratio:.1f}x vs I={interval:g}")
            ratios = ", ".join(parts) or "-"
        lost = (
            f"{s.lost} (no restart in {s.lost_after:g} s)" if s.lost else "0"
        )
        base_rows.append([
            s.broker, what, s.trials, len(s.delays), lost, p50_text, p95_text,
            max_text, ratios,
        ])
    if base_rows:
        out += [
            "",
            "The same kill without turnout (plain Celery task, same broker)",
            "",
            table(["broker", "task", "trials", "recovered", "lost", "p50 s",
                   "p95 s", "max s", "p50 / turnout p50"], base_rows),
        ]
    errors = [f"{s.label}: {e}" for s in scenarios for e in s.errors]
    if errors:
        out += ["", "Failed trials:", *errors]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run every scenario, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis,rabbitmq,filesystem",
                        help=f"comma-separated, of {','.join(BROKERS)}")
    parser.add_argument("--intervals", default="1,5",
                        help="supervise intervals in seconds, comma-separated")
    parser.add_argument("--trials", type=int, default=30,
                        help="kills per broker and interval")
    parser.add_argument("--baseline-trials", type=int, default=10,
                        help="kills per acks_late baseline (0: none)")
    parser.add_argument("--lost-trials", type=int, default=3,
                        help="kills per early-ack baseline (0: none)")
    parser.add_argument("--visibility-timeout", type=float, default=30.0,
                        help="Redis visibility_timeout of the acks_late baseline")
    parser.add_argument("--lost-after", type=float, default=20.0,
                        help="seconds without a restart that count a job lost")
    parser.add_argument("--parallel", type=int, default=3,
                        help="scenarios run at the same time")
    add_source_option(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.brokers.split(",") if n]
    intervals = [float(i) for i in args.intervals.split(",") if i]

    scenarios: list[Scenario] = []
    for name in names:
        for interval in intervals:
            scenarios.append(Scenario(name, "turnout", interval, args.trials,
                                      3 * interval + 30))
        if name == "filesystem":
            continue  # it never redelivers: acks_late is no help there
        if args.baseline_trials:
            late_timeout = (
                args.visibility_timeout + 30 if name == "redis" else 30.0
            )
            scenarios.append(Scenario(name, "late", 1.0, args.baseline_trials,
                                      late_timeout))
        if args.lost_trials:
            scenarios.append(Scenario(name, "early", 1.0, args.lost_trials,
                                      args.lost_after))
    # Longest first, so that the parallel slots finish together.
    scenarios.sort(key=lambda s: -s.trials * (
        3 * s.interval if s.mode == "turnout" else s.lost_after
    ))

    install_cleanup()
    workdir = make_workdir("failover")
    pin_turnout(args.turnout_ref, workdir)
    with brokers(names, workdir) as found:
        print(versions(found["rabbitmq"].rabbit if "rabbitmq" in found else None))
        print("# " + " ".join(["nice -n 10 .venv/bin/python bench/failover.py",
                               *(argv if argv is not None else sys.argv[1:])]))
        pending = list(scenarios)
        running: list[threading.Thread] = []
        try:
            while pending or running:
                running = [t for t in running if t.is_alive()]
                while pending and len(running) < args.parallel:
                    s = pending.pop(0)
                    thread = threading.Thread(
                        target=run_scenario, daemon=True, name=s.label,
                        args=(s, found[s.broker], workdir, args.visibility_timeout),
                    )
                    thread.start()
                    running.append(thread)
                    say(f"[{s.label}] started")
                time.sleep(0.2)
        except KeyboardInterrupt:
            _stop.set()
            raise
    print()
    print(summarize(scenarios, args.visibility_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
