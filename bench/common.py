"""What every benchmark shares: brokers, worker processes, waits, tables, cleanup.

The ideas are those of the integration-test harness (``tests/integration``):
workers are real ``celery worker`` processes, each in a session of its own so
that its whole process group can be killed; jobs write start records that the
benchmark reads; every wait polls a condition until a deadline.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from brokers import RabbitServer, RedisServer, rabbit_server, redis_server

T = TypeVar("T")

#: The folder of this file; worker processes import ``benchapp`` from it.
BENCH_DIR = Path(__file__).resolve().parent

#: Every broker a benchmark can run on.
BROKERS = ("redis", "rabbitmq", "filesystem")

#: How long a worker may take from its start to its first answer to a ping.
READY_TIMEOUT = 90.0

_live: dict[int, subprocess.Popen[bytes]] = {}


def _kill_all() -> None:
    for process in list(_live.values()):
        kill_group(process)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group led by ``process`` and reap its leader."""
    try:
        os.killpg(process.pid, signal.SIGCONT)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _live.pop(process.pid, None)


def _on_terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    """Kill every worker this process started, at exit and on SIGTERM or Ctrl-C."""
    atexit.register(_kill_all)
    signal.signal(signal.SIGTERM, _on_terminate)


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, poll: float = 0.05
) -> T:
    """Return the first truthy ``condition()`` within ``timeout`` seconds.

    Raises:
        TimeoutError: the condition stayed falsy until the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout:.1f} s for {what}, in vain")
        time.sleep(poll)


@dataclass
class Broker:
    """How to reach one broker, the result backend and turnout's store."""

    name: str
    url: str
    result_backend: str
    store_url: str
    counter_url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    redis: RedisServer | None = None
    rabbit: RabbitServer | None = None

    def env(self) -> dict[str, str]:
        """The ``BENCH_*`` variables that select this broker."""
        return {
            "BENCH_BROKER_URL": self.url,
            "BENCH_TRANSPORT_OPTIONS": json.dumps(self.transport_options),
            "BENCH_RESULT_BACKEND": self.result_backend,
            "BENCH_STORE_URL": self.store_url,
            "BENCH_COUNTER_URL": self.counter_url,
        }


@contextmanager
def brokers(names: Sequence[str], workdir: Path) -> Iterator[dict[str, Broker]]:
    """Start private servers for the named brokers; yield them by name.

    Redis serves as the broker (db 0), result backend (db 1), turnout store
    (db 2) and short-job counter (db 3) of the Redis broker; a second private
    Redis does the same for RabbitMQ and the filesystem transport, so that the
    Redis broker's command counts are its own.
    """
    with ExitStack() as stack:
        found: dict[str, Broker] = {}
        side: RedisServer | None = None

        def side_redis() -> RedisServer:
            nonlocal side
            if side is None:
                side = stack.enter_context(redis_server(workdir))
            return side

        for name in names:
            if name == "redis":
                server = stack.enter_context(redis_server(workdir))
                found[name] = Broker(
                    name, server.url(0), server.url(1), server.url(2),
                    server.url(3), redis=server,
                )
            elif name == "rabbitmq":
                node = stack.enter_context(rabbit_server(workdir))
                aux = side_redis()
                found[name] = Broker(
                    name, node.url, aux.url(1), aux.url(2), aux.url(3),
                    redis=aux, rabbit=node,
                )
            elif name == "filesystem":
                root = workdir / "filesystem"
                data, control = root / "data", root / "control"
                for folder in (data, control, root / "store"):
                    folder.mkdir(parents=True, exist_ok=True)
                aux = side_redis()
                found[name] = Broker(
                    name, "filesystem://", aux.url(1), f"file://{root / 'store'}",
                    aux.url(3), redis=aux,
                    transport_options={
                        "data_folder_in": str(data),
                        "data_folder_out": str(data),
                        "control_folder": str(control),
                        "polling_interval": 0.05,
                    },
                )
            else:
                raise ValueError(f"unknown broker {name!r}; use one of {BROKERS}")
        yield found


#: Which celery_turnout the run measures, for :func:`versions`.
_turnout_source = "working tree"


def add_source_option(parser: Any) -> None:
    """Add ``--turnout-ref`` to a benchmark's options."""
    parser.add_argument(
        "--turnout-ref", default="HEAD",
        help="git ref of celery_turnout to measure ('worktree': the files as "
        "they are now); other developers edit the tree while benchmarks run",
    )


def pin_turnout(ref: str, workdir: Path) -> None:
    """Make this process and every worker import celery_turnout at ``ref``.

    The package is exported from git into ``workdir`` and put first on
    ``sys.path`` and ``PYTHONPATH``, ahead of the editable install.
    """
    global _turnout_source
    root = BENCH_DIR.parent
    if ref == "worktree":
        changed = subprocess.run(
            ["git", "status", "--short", "celery_turnout"], cwd=root,
            capture_output=True, text=True, check=False,
        ).stdout.split("\n")
        head = _git(root, "rev-parse", "--short", "HEAD")
        dirty = len([line for line in changed if line.strip()])
        _turnout_source = f"working tree at {head} with {dirty} changed files"
        return
    commit = _git(root, "rev-parse", "--short", ref)
    target = workdir / "src"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", commit, "celery_turnout"], cwd=root,
        capture_output=True, check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = ":".join(
        [str(target), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    )
    _turnout_source = f"commit {commit}"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True,
    ).stdout.strip()


def make_workdir(name: str) -> Path:
    """A fresh folder for one run's logs and records; printed so it can be read."""
    path = Path(tempfile.mkdtemp(prefix=f"turnout-bench-{name}-"))
    print(f"# logs and records in {path}", flush=True)
    return path


@dataclass
class Worker:
    """One ``celery worker`` process this benchmark started."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The pid of the worker's main process."""
        return self.process.pid

    def kill(self) -> float:
        """SIGKILL the main process only (pool children die with it); return when."""
        os.kill(self.pid, signal.SIGKILL)
        return time.time()

    def alive(self) -> bool:
        """True while the main process runs."""
        return self.process.poll() is None

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the main process, all its threads."""
        return process_cpu(self.pid)

    def log(self) -> str:
        """What the worker logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self, timeout: float = 20.0) -> None:
        """Ask for a warm shutdown; kill the group if it takes too long."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.destroy()

    def destroy(self) -> None:
        """Kill the worker's whole process group and reap it."""
        kill_group(self.process)


_TICKS = os.sysconf("SC_CLK_TCK")


#: The log lines of a supervise tick that covers jobs: one line per job, or a
#: line that counts them when a tick covers more than a few.
_COVERED_ONE = re.compile(r"attempt \d+ is covered by supervise tick")
_COVERED_MANY = re.compile(r"(\d+) jobs are covered by supervise tick")


def covered_jobs(log: str) -> int:
    """How many jobs a worker's log says its supervise ticks covered."""
    many = sum(int(count) for count in _COVERED_MANY.findall(log))
    return len(_COVERED_ONE.findall(log)) + many


def process_cpu(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (from ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


class Cluster:
    """The app, the workers and the job records of one benchmark scenario.

    Each cluster has its own job queue and turnout prefix, so clusters on the
    same broker never see each other's messages or checks.
    """

    def __init__(
        self, broker: Broker, workdir: Path, interval: float, label: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare a cluster; no worker starts before :meth:`start`."""
        token = uuid.uuid4().hex[:8]
        self.broker = broker
        self.label = label
        self.token = token
        self.directory = workdir / f"{label}-{token}"
        self.records = self.directory / "records"
        self.records.mkdir(parents=True)
        self.env = broker.env() | {
            "BENCH_QUEUE": f"bench-{token}",
            "BENCH_PREFIX": f"turnout-bench-{token}",
            "BENCH_INTERVAL": repr(float(interval)),
            "BENCH_RECORDS": str(self.records),
        } | dict(extra_env or {})
        self.interval = interval
        self.workers: list[Worker] = []
        self._app: Any = None

    @property
    def app(self) -> Any:
        """This process's copy of the app, built on first use."""
        if self._app is None:
            from benchapp import create_app

            self._app = create_app(self.env)
        return self._app

    def spawn(
        self, pool: str = "prefork", concurrency: int = 2,
        extra: Sequence[str] = (), profiled: bool = False,
    ) -> Worker:
        """Start one worker process; return at once (see :meth:`wait_ready`).

        A ``profiled`` worker runs its main thread under cProfile (see
        ``profiled_worker.py``) and writes the profile where ``BENCH_PROFILE``
        says when it exits.
        """
        index = len(self.workers) + 1
        base = f"{self.label}{index}-{self.token}"
        log_path = self.directory / f"worker-{index}.log"
        runner = (
            [str(BENCH_DIR / "profiled_worker.py")] if profiled else ["-m", "celery"]
        )
        command = [
            sys.executable, *runner, "-A", "benchapp", "worker",
            "-P", pool, "-c", str(concurrency), "-n", f"{base}@%h",
            "--loglevel=INFO", *extra,
        ]  # fmt: skip
        env = dict(os.environ) | self.env
        env["PYTHONPATH"] = ":".join(
            [str(BENCH_DIR), *filter(None, env.get("PYTHONPATH", "").split(":"))]
        )
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _live[process.pid] = process
        worker = Worker(f"{base}@{socket.gethostname()}", process, log_path)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: Worker, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``worker`` answers a ping."""

        def answers() -> bool:
            if not worker.alive():
                raise RuntimeError(
                    f"worker {worker.name} exited before it answered a ping; "
                    f"see {worker.log_path}"
                )
            try:
                replies = self.app.control.ping(destination=[worker.name], timeout=0.5)
            except ValueError:
                return False  # the filesystem transport read a half-written reply
            return any(worker.name in reply for reply in replies)

        wait_for(answers, timeout, f"worker {worker.name} to answer a ping", poll=0.2)

    def start(self, count: int, **options: Any) -> list[Worker]:
        """Start ``count`` workers and wait until each answers a ping."""
        started = [self.spawn(**options) for _ in range(count)]
        for worker in started:
            self.wait_ready(worker)
        return started

    def live(self) -> list[Worker]:
        """Workers whose main process still runs."""
        return [w for w in self.workers if w.alive()]

    def by_name(self, name: str) -> Worker:
        """The worker called ``name``."""
        for worker in self.workers:
            if worker.name == name:
                return worker
        raise LookupError(name)

    def starts(self, job_id: str) -> list[dict[str, Any]]:
        """The start records of one job, oldest first."""
        path = self.records / f"{job_id}.jsonl"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def started(self, job_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        """The first start record of a job (of one attempt, if given)."""
        for line in self.starts(job_id):
            if attempt is None or line["attempt"] == attempt:
                return line
        return None

    def stop_job(self, job_id: str) -> None:
        """Tell every copy of a sleeping job to end now."""
        (self.records / f"{job_id}.stop").touch()

    def grep_logs(self, text: str) -> list[str]:
        """Every log line of every worker that contains ``text``."""
        return [
            line for worker in self.workers for line in worker.log().splitlines()
            if text in line
        ]

    def destroy(self) -> None:
        """Kill every worker's process group."""
        for worker in self.workers:
            worker.destroy()


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank, as in p95 of SLOs)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-int(round(fraction * 1000)) * len(ordered) // 1000))
    return ordered[min(rank, len(ordered)) - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.ljust(w) for c, w in zip(row, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def versions(rabbit: RabbitServer | None = None) -> str:
    """One line naming the versions and the machine this run measured."""
    import celery
    import kombu
    import redis

    server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False,
    ).stdout.split()
    redis_version = next(
        (w.split("=", 1)[1] for w in server if w.startswith("v=")), "?",
    )
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        time.strftime("%Y-%m-%d %H:%M %Z"), f"celery_turnout {_turnout_source}",
        f"celery {celery.__version__}", f"kombu {kombu.__version__}",
        f"redis-py {redis.__version__}", f"Redis {redis_version}",
    ]
    if rabbit is not None:
        parts.append(f"RabbitMQ {rabbit.version()}")
    parts += [f"Python {platform.python_version()}", f"nproc {os.cpu_count()}",
              f"CPU {model}", f"nice {os.nice(0)}"]
    return "# " + ", ".join(parts)

