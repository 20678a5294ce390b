"""Real worker processes, their records and their logs, for the integration tests.

Nothing here sleeps blindly: every wait polls a condition until a deadline and says
what it was waiting for when the deadline passes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app import create_app
from celery import Celery
from celery.result import AsyncResult

T = TypeVar("T")

#: Where ``app.py`` lives: worker processes import it as the module ``app``.
APP_DIR = Path(__file__).resolve().parent

#: How long a worker may take from its start to its first answer to a ping.
READY_TIMEOUT = 60.0

#: How often a condition is checked while waiting for it.
POLL = 0.05


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    poll: float = POLL,
) -> T:
    """Return the first truthy value of ``condition()`` within ``timeout`` seconds.

    Args:
        condition: Called until it returns something truthy.
        timeout: Seconds before giving up.
        what: The awaited event, for the failure message.
        poll: Seconds between two calls.

    Raises:
        AssertionError: The condition stayed falsy until the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:.1f} s for {what}, in vain")
        time.sleep(poll)


def stays_false(
    condition: Callable[[], Any], duration: float, poll: float = POLL
) -> bool:
    """Watch ``condition()`` for ``duration`` seconds; True if it never held."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if condition():
            return False
        time.sleep(poll)
    return not condition()


def wait_for_one_errback(cluster: Cluster, job_id: str) -> None:
    """Wait for the ``it.errback`` call of a failed job, then see no second one."""
    wait_for(
        lambda: cluster.records.events(job_id, "errback"),
        20,
        f"the errback of job {job_id} to run",
    )
    assert stays_false(
        lambda: len(cluster.records.events(job_id, "errback")) > 1,
        3 * cluster.interval,
    ), f"the errback of job {job_id} must run once"


@dataclass
class Records:
    """What the test jobs wrote about themselves, one JSON line per event."""

    directory: Path

    def of(self, job_id: str) -> list[dict[str, Any]]:
        """Return every record of one job, oldest first."""
        path = self.directory / f"{job_id}.jsonl"
        if not path.exists():
            return []
        # A line still being written has no newline yet: leave it for later.
        complete = path.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def events(
        self, job_id: str, event: str, attempt: int | None = None
    ) -> list[dict[str, Any]]:
        """Return one job's records of ``event``, optionally of one attempt only."""
        return [
            r
            for r in self.of(job_id)
            if r["event"] == event and (attempt is None or r["attempt"] == attempt)
        ]

    def started(self, job_id: str, attempt: int | None = None) -> dict[str, Any] | None:
        """Return the first start record of a job (or of one attempt), if any."""
        found = self.events(job_id, "start", attempt)
        return found[0] if found else None


@dataclass
class Worker:
    """One ``celery worker`` process started by a test."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = False

    @property
    def pid(self) -> int:
        """The pid of the worker's main process."""
        return self.process.pid

    def signal(self, signum: int) -> float:
        """Send ``signum`` to the main process only; return when it was sent."""
        os.kill(self.pid, signum)
        if signum == signal.SIGSTOP:
            self.stopped = True
        elif signum == signal.SIGCONT:
            self.stopped = False
        return time.time()

    def kill(self) -> float:
        """SIGKILL the main process (its pool children die with it)."""
        return self.signal(signal.SIGKILL)

    def stop(self) -> float:
        """SIGSTOP the main process, as a long pause would."""
        return self.signal(signal.SIGSTOP)

    def resume(self) -> float:
        """SIGCONT a stopped main process."""
        return self.signal(signal.SIGCONT)

    def log(self) -> str:
        """Return everything the worker has logged so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def destroy(self) -> None:
        """Kill the worker's whole process group and reap the main process."""
        try:
            os.killpg(self.pid, signal.SIGCONT)
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Cluster:
    """The app, worker processes and job records of one test.

    The test process builds its own copy of the app from the same variables the
    workers get, and uses it to send jobs, read results and ping workers.
    """

    def __init__(
        self, broker_name: str, env: Mapping[str, str], directory: Path, token: str
    ) -> None:
        """Prepare a cluster; no process starts before :meth:`start`.

        Args:
            broker_name: Which broker the cluster runs on, for messages.
            env: The ``TURNOUT_IT_*`` variables shared by workers and the test.
            directory: Where worker logs go.
            token: Unique to the test; part of every worker's node name.
        """
        self.broker_name = broker_name
        self.env = dict(env)
        self.directory = directory
        self.token = token
        self.workers: list[Worker] = []
        self.records = Records(Path(self.env["TURNOUT_IT_RECORDS"]))
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        """The test process's copy of the app, built on first use."""
        if self._app is None:
            self._app = create_app(self.env)
        return self._app

    @property
    def interval(self) -> float:
        """``turnout_supervise_interval`` in seconds."""
        return float(self.app.conf.turnout_supervise_interval)

    def set_transport_options(self, **options: Any) -> None:
        """Add broker transport options; only before the first worker starts."""
        assert self._app is None and not self.workers, "configure before starting"
        current = json.loads(self.env.get("TURNOUT_IT_TRANSPORT_OPTIONS", "{}"))
        current.update(options)
        self.env["TURNOUT_IT_TRANSPORT_OPTIONS"] = json.dumps(current)

    def start(self, count: int = 2, concurrency: int = 2) -> list[Worker]:
        """Start ``count`` workers and return once each one answers a ping.

        Args:
            count: How many worker processes to start.
            concurrency: Pool processes per worker (``-c``).

        Returns:
            The new workers, in the order they were started.
        """
        if self.broker_name == "filesystem":
            # kombu's filesystem transport rewrites its exchange table in place:
            # a worker that reads it while another starts up can die on a
            # half-written file. One at a time, then.
            started = []
            for _ in range(count):
                started.append(self._spawn(concurrency))
                self._wait_ready(started[-1])
            return started
        started = [self._spawn(concurrency) for _ in range(count)]
        for worker in started:
            self._wait_ready(worker)
        return started

    def _spawn(self, concurrency: int) -> Worker:
        index = len(self.workers) + 1
        base = f"w{index}-{self.token}"
        name = f"{base}@{socket.gethostname()}"
        log_path = self.directory / f"worker-{index}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "app", "worker",
            "-P", "prefork", "-c", str(concurrency),
            "-n", f"{base}@%h", "--loglevel=INFO",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=self.directory,
                env=worker_environment(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name=name, process=process, log_path=log_path)
        self.workers.append(worker)
        return worker

    def _wait_ready(self, worker: Worker) -> None:
        def answers() -> bool:
            if worker.process.poll() is not None:
                raise AssertionError(
                    f"worker {worker.name} exited with {worker.process.returncode} "
                    f"before it answered a ping:\n{worker.log()}"
                )
            try:
                replies = self.app.control.ping(destination=[worker.name], timeout=0.5)
            except ValueError:
                # kombu's filesystem transport can hand a reader a reply file its
                # writer created but has not filled yet: that reply is lost, so
                # ask again.
                return False
            return any(worker.name in reply for reply in replies)

        wait_for(answers, READY_TIMEOUT, f"worker {worker.name} to answer a ping")

    def send(self, task: str, *args: Any) -> AsyncResult:
        """Send one job by task name; return its result handle."""
        return self.app.send_task(task, args=args)

    def wait_started(
        self, job_id: str, attempt: int | None = 1, timeout: float = 20.0
    ) -> dict[str, Any]:
        """Wait for the start record of one attempt (None: any) of a job."""
        return wait_for(
            lambda: self.records.started(job_id, attempt),
            timeout,
            f"attempt {attempt} of job {job_id} to start",
        )

    def wait_until_logged(self, text: str, timeout: float) -> Worker:
        """Wait until some worker logs ``text``; return that worker."""
        return wait_for(
            lambda: next((w for w in self.workers if text in w.log()), None),
            timeout,
            f"a worker to log {text!r}",
        )

    def owner_of(self, record: Mapping[str, Any]) -> Worker:
        """Return the worker that wrote ``record``."""
        for worker in self.workers:
            if worker.name == record["worker"]:
                return worker
        raise LookupError(f"no worker of this test is named {record['worker']!r}")

    def others(self, worker: Worker) -> list[Worker]:
        """Return every worker but ``worker``."""
        return [w for w in self.workers if w is not worker]

    def inspect(self, command: str) -> dict[str, Any]:
        """Run ``celery inspect COMMAND --json``; return {node name: reply}."""
        names = ",".join(w.name for w in self.workers if w.process.poll() is None)
        output = celery_cli(
            self.env, "inspect", command, "--json", "-d", names, "-t", "5"
        )
        replies: dict[str, Any] = json.loads(output)
        return replies

    def logs(self) -> Iterator[tuple[str, str]]:
        """Yield (worker name, log text) for every worker started."""
        for worker in self.workers:
            yield worker.name, worker.log()

    def destroy(self) -> None:
        """Kill every worker's process group; safe to call more than once."""
        for worker in self.workers:
            worker.destroy()


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Return the environment of a worker or CLI process configured by ``env``."""
    merged = dict(os.environ)
    merged.update(env)
    path = [str(APP_DIR)] + [p for p in merged.get("PYTHONPATH", "").split(":") if p]
    merged["PYTHONPATH"] = ":".join(path)
    merged["PYTHONUNBUFFERED"] = "1"
    return merged


def celery_cli(env: Mapping[str, str], *args: str, timeout: float = 60) -> str:
    """Run ``celery -A app ARGS`` like a user would; return its standard output."""
    completed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", *args],
        env=worker_environment(env),
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"celery {' '.join(args)} exited with {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl ARGS`` against the local node; return its output."""
    completed = subprocess.run(
        ["rabbitmqctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return completed.stdout
