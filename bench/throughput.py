"""Throughput: short jobs per second as turnout tasks and as plain Celery tasks.

Three tasks run the same function (one ``INCR`` on a Redis counter) on the same
two workers (prefork, ``-c 2`` each) and broker: a plain Celery task with
Celery's default early acknowledgement (the baseline of the ratio), the same
with ``acks_late``, and a turnout task. For each variant the
benchmark fills a fresh queue with ``--jobs`` messages while no worker
consumes it, then tells both workers to consume it (``add_consumer``) and
times until the counter reaches the number of jobs. Variants alternate
(plain, plain-late, turnout, plain, ...) for ``--rounds`` rounds, so all see
the same machine; the ratios are taken within each round.

A turnout job that ends before its first supervise tick is acknowledged after
it ran, like an ``acks_late`` task; the plain-late column shows what that alone
costs.

``--profile`` repeats one turnout round with the first worker's main process
under cProfile and a py-spy ``dump`` of it when py-spy is on the PATH, and
prints where that process spends its time.
"""

from __future__ import annotations

import argparse
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    Broker,
    Cluster,
    Worker,
    add_source_option,
    brokers,
    install_cleanup,
    kill_group,
    make_workdir,
    pin_turnout,
    process_cpu,
    table,
    versions,
    wait_for,
)

#: The task of each variant.
TASKS = {
    "plain": "bench.short_plain",
    "plain-late": "bench.short_plain_late",
    "turnout": "bench.short_turnout",
}


def fill(
    cluster: Cluster, task: str, queue: str, counter: str, jobs: int, cpu_ms: float,
) -> float:
    """Publish ``jobs`` messages to ``queue``; return the seconds it took."""
    started = time.monotonic()
    app = cluster.app
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            app.send_task(task, args=(counter, cpu_ms), queue=queue,
                          producer=producer)
    return time.monotonic() - started


def cpu_split(workers: list[Worker], redis_pid: int) -> dict[str, float]:
    """CPU seconds so far of the workers' main processes, their pool processes
    and the Redis server that holds the store, counter and results."""
    main = pool = 0.0
    for worker in workers:
        main += process_cpu(worker.pid)
        path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
        for child in path.read_text().split():
            try:
                pool += process_cpu(int(child))
            except FileNotFoundError:
                pass
    return {"main": main, "pool": pool, "redis": process_cpu(redis_pid)}


def run_variant(
    cluster: Cluster, workers: list[Worker], variant: str, jobs: int,
    cpu_ms: float = 0.0,
) -> dict[str, Any]:
    """Fill a queue with one variant's jobs, let the workers drain it, time it."""
    queue = f"tp-{variant}-{uuid.uuid4().hex[:8]}"
    counter = f"done:{queue}"
    filled = fill(cluster, TASKS[variant], queue, counter, jobs, cpu_ms)
    client = cluster.broker.redis
    assert client is not None
    redis = client.client(3)
    names = [w.name for w in workers]
    cpu_before = cpu_split(workers, client.process.pid)
    started = time.monotonic()
    cluster.app.control.add_consumer(queue, destination=names, reply=True, timeout=5)
    wait_for(lambda: int(redis.get(counter) or 0) >= jobs, 1800,
             f"{jobs} {variant} jobs", poll=0.02)
    elapsed = time.monotonic() - started
    cpu_after = cpu_split(workers, client.process.pid)
    cpu = {k: 1000 * (cpu_after[k] - cpu_before[k]) / jobs for k in cpu_after}
    cluster.app.control.cancel_consumer(queue, destination=names, reply=True,
                                        timeout=5)
    time.sleep(1.0)
    final = int(redis.get(counter) or 0)
    return {"variant": variant, "jobs": jobs, "seconds": elapsed,
            "rate": jobs / elapsed, "fill": filled, "runs": final, "cpu": cpu}


def profile_round(
    broker: Broker, workdir: Path, interval: float, jobs: int, py_spy: str,
) -> str:
    """One turnout round with worker 1's main process under cProfile.

    With ``py_spy`` (the path of a py-spy binary), worker 2 is sampled at the
    same time, main and pool processes, on CPU only.
    """
    cluster = Cluster(broker, workdir, interval, f"{broker.name}-profile",
                      {"BENCH_PROFILE": str(workdir / "main.pstats")})
    try:
        idle = f"idle-{cluster.token}"
        first = cluster.spawn(extra=("-Q", idle), profiled=True)
        second = cluster.spawn(extra=("-Q", idle))
        for worker in (first, second):
            cluster.wait_ready(worker)
        samplers: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        if py_spy:
            children = Path(f"/proc/{second.pid}/task/{second.pid}/children")
            pids = [("main", second.pid)] + [
                ("pool", int(pid)) for pid in children.read_text().split()
            ]
            for role, pid in pids:
                folded = workdir / f"py-spy-{role}-{pid}.txt"
                sampler = subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--format", "raw",
                     "--rate", "200", "--nonblocking", "-o", str(folded)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
                samplers.append((role, folded, sampler))
            time.sleep(1.0)
        result = run_variant(cluster, [first, second], "turnout", jobs)
        for _, _, sampler in samplers:
            sampler.send_signal(signal.SIGINT)
        for _, _, sampler in samplers:
            try:
                sampler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kill_group(sampler)
        first.terminate(timeout=60)
    finally:
        cluster.destroy()
    stats = pstats.Stats(str(workdir / "main.pstats"))
    lines = [f"profiled turnout round: {result['rate']:.0f} jobs/s"]
    for sort in ("tottime", "cumulative"):
        listing = _capture(stats, sort)
        lines += ["", f"worker 1 main process, top functions by {sort}:", listing]
    if samplers:
        lines += ["", summarize_folded(
            [(role, path.read_text()) for role, path, _ in samplers if path.exists()]
        )]
    return "\n".join(lines)


#: Functions whose inclusive share of the samples the summary reports, as
#: (function name, a fragment of its file path).
WATCHED = (
    ("handle_job", "celery_turnout/intake.py"),
    ("admit", "celery_turnout/intake.py"),
    ("admit", "celery_turnout/store.py"),
    ("task_message_handler", "celery/worker/strategy.py"),
    ("_tick", "celery_turnout/supervision.py"),
    ("trace_task", "celery/app/trace.py"),
    ("__call__", "celery_turnout/task.py"),
    ("superseded", "celery_turnout/store.py"),
    ("update_state", "celery/app/task.py"),
    ("_finish", "celery_turnout/task.py"),
    ("finish", "celery_turnout/store.py"),
    ("log", "celery_turnout/store.py"),
    ("short", "benchapp.py"),
    ("mark_as_done", "celery/backends/base.py"),
)


def summarize_folded(profiles: list[tuple[str, str]]) -> str:
    """Inclusive shares of the watched functions, main process vs pool processes.

    Each profile is a role (``main`` or ``pool``) and py-spy's raw output: one
    ``frame;frame;... count`` per line.
    """
    totals: dict[str, int] = {}
    shares: dict[tuple[str, tuple[str, str]], int] = {}
    lines = [(role, line) for role, text in profiles for line in text.splitlines()]
    for role, line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        totals[role] = totals.get(role, 0) + count
        seen = set()
        for frame in frames:
            function, _, where = frame.partition(" (")
            for name in WATCHED:
                if function.rsplit(".", 1)[-1] == name[0] and name[1] in where:
                    seen.add(name)
        for name in seen:
            shares[(role, name)] = shares.get((role, name), 0) + count
    rows = []
    for (role, name), count in sorted(shares.items(), key=lambda kv: -kv[1]):
        rows.append([role, name[0], name[1], f"{100 * count / totals[role]:.1f}%"])
    header = (
        "worker 2 (py-spy, 200 Hz, samples of non-idle threads, which include "
        "waits for Redis replies): share of samples inside each function; "
        f"samples: main process {totals.get('main', 0)}, pool "
        f"processes {totals.get('pool', 0)}"
    )
    return "\n".join([header, "", table(["process", "function", "module",
                                          "share"], rows)])


def _cpu(split: dict[str, float]) -> str:
    return "{main:.2f}+{pool:.2f}+{redis:.2f}".format(**split)


def measure_rounds(
    cluster: Cluster, workers: list[Worker], jobs: int, rounds: int, cpu_ms: float,
) -> list[list[Any]]:
    """Alternate the variants for ``rounds`` rounds; one table row per round."""
    name = cluster.broker.name
    rows: list[list[Any]] = []
    ratios: list[float] = []
    late_ratios: list[float] = []
    for number in range(1, rounds + 1):
        results = {}
        for variant in TASKS:
            r = run_variant(cluster, workers, variant, jobs, cpu_ms)
            print(f"[{name}] {cpu_ms:g} ms, round {number}, {variant}: {r}",
                  flush=True)
            results[variant] = r
        plain, late, turnout = (results[v] for v in TASKS)
        ratios.append(turnout["rate"] / plain["rate"])
        late_ratios.append(turnout["rate"] / late["rate"])
        rows.append([
            name, f"{cpu_ms:g}", number, jobs,
            *(f"{results[v]['rate']:.0f}" for v in TASKS),
            f"{ratios[-1]:.2f}", f"{late_ratios[-1]:.2f}",
            "/".join(str(results[v]["runs"]) for v in TASKS),
            *(_cpu(results[v]["cpu"]) for v in TASKS),
        ])
    if rounds > 1:
        rows.append([name, f"{cpu_ms:g}", "median", "", "", "", "",
                     f"{statistics.median(ratios):.2f}",
                     f"{statistics.median(late_ratios):.2f}", "", "", "", ""])
    return rows


def _capture(stats: pstats.Stats, sort: str) -> str:
    import io

    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(25)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the rounds on each broker, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis,rabbitmq",
                        help="comma-separated, of redis,rabbitmq,filesystem")
    parser.add_argument("--jobs", type=int, default=10_000,
                        help="jobs per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--job-cpu-ms", default="0",
                        help="CPU milliseconds each job spends before it counts "
                             "itself, comma-separated: one set of rounds each")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="turnout supervise interval in seconds")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the main process of one turnout round")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "",
                        help="py-spy binary for --profile (default: on PATH)")
    add_source_option(parser)
    args = parser.parse_args(argv)
    names = [n for n in args.brokers.split(",") if n]
    cpu_costs = [float(n) for n in args.job_cpu_ms.split(",") if n]

    install_cleanup()
    workdir = make_workdir("throughput")
    pin_turnout(args.turnout_ref, workdir)
    rows = []
    profiles = []
    with brokers(names, workdir) as found:
        print(versions(found["rabbitmq"].rabbit if "rabbitmq" in found else None))
        print("# " + " ".join(["nice -n 10 .venv/bin/python bench/throughput.py",
                               *(argv if argv is not None else sys.argv[1:])]))
        for name in names:
            cluster = Cluster(found[name], workdir, args.interval, f"{name}-tp")
            try:
                idle = f"idle-{cluster.token}"
                workers = [cluster.spawn(extra=("-Q", idle)) for _ in range(2)]
                for worker in workers:
                    cluster.wait_ready(worker)
                for cpu_ms in cpu_costs:
                    rows += measure_rounds(cluster, workers, args.jobs, args.rounds,
                                           cpu_ms)
            finally:
                cluster.destroy()
            if args.profile:
                profiles.append(profile_round(found[name], workdir, args.interval,
                                              args.jobs, args.py_spy))
    print()
    print("Short jobs, 2 workers x prefork -c 2, jobs per second while draining a "
          f"full queue (turnout interval {args.interval:g} s)")
    print()
    print(table(["broker", "job CPU ms", "round", "jobs", "plain jobs/s",
                 "plain-late jobs/s", "turnout jobs/s", "turnout/plain",
                 "turnout/plain-late",
                 "runs counted plain/late/turnout",
                 "plain CPU ms/job main+pool+redis",
                 "plain-late CPU ms/job", "turnout CPU ms/job"], rows))
    for text in profiles:
        print()
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
