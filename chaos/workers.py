"""The worker processes of a chaos run, and a watch on every process they fork.

:class:`ChaosCluster` is the integration harness's :class:`harness.Cluster`
with two changes: its workers also import :mod:`chaos.jobs`, and each start is
serialised, so that restarts from several threads get distinct names. Every
start gets a new node name (``w4-<token>@host`` after ``w1`` to ``w3``), so a
worker name in a job's history names one process incarnation.

:class:`ProcessWatch` polls ``/proc`` for the processes of every worker's
process group (the main process and its pool processes) and notes when each
was first seen and when it was gone (exited, or a zombie), so that a job copy
can be counted as stopped when its process died.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import Cluster, Worker, worker_environment

#: Seconds between two scans of ``/proc``.
WATCH_POLL = 0.25


class ChaosCluster(Cluster):
    """The harness's cluster, whose workers also run the chaos job."""

    def __init__(
        self,
        broker_name: str,
        env: Mapping[str, str],
        directory: Path,
        token: str,
        log_level: str = "INFO",
    ) -> None:
        """Prepare a cluster; see :class:`harness.Cluster`.

        Args:
            broker_name: ``redis`` or ``rabbitmq``.
            env: The ``TURNOUT_IT_*`` variables (plus ``PYTHONPATH``).
            directory: The run folder: worker logs and the workers' cwd.
            token: Unique to the run; part of every node name.
            log_level: The workers' ``--loglevel``.
        """
        super().__init__(broker_name, env, directory, token)
        self.log_level = log_level
        self._spawning = threading.Lock()

    def spawn(self, concurrency: int) -> Worker:
        """Start one worker process without waiting for it; thread-safe."""
        with self._spawning:
            return self._spawn(concurrency)

    def wait_ready(self, worker: Worker) -> None:
        """Wait until ``worker`` answers a ping (see :class:`harness.Cluster`).

        Raises:
            AssertionError: it exited or did not answer in time.
        """
        self._wait_ready(worker)

    def _spawn(self, concurrency: int) -> Worker:
        index = len(self.workers) + 1
        base = f"w{index}-{self.token}"
        name = f"{base}@{socket.gethostname()}"
        log_path = self.directory / f"worker-{index}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "app", "worker",
            "--include", "chaos.jobs",
            "-P", "prefork", "-c", str(concurrency),
            "-n", f"{base}@%h", f"--loglevel={self.log_level}",
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


@dataclass
class ProcessLife:
    """One process of a worker's process group, as the watch saw it.

    Attributes:
        pid: The process id.
        group: The process group: the pid of the worker's main process.
        started: The process's start time in clock ticks since boot, which
            tells a reused pid from the process that had it before.
        first_seen: When the watch first saw the process (epoch seconds).
        gone_at: When the watch first found it gone or a zombie, or None.
    """

    pid: int
    group: int
    started: int
    first_seen: float
    gone_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


class ProcessWatch:
    """A thread that notes the birth and death of every process of some groups."""

    def __init__(self, poll: float = WATCH_POLL) -> None:
        """Prepare the watch; :meth:`start` starts its thread."""
        self.poll = poll
        self.lives: list[ProcessLife] = []
        self._groups: set[int] = set()
        self._live: dict[tuple[int, int], ProcessLife] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="chaos-process-watch", daemon=True
        )

    def add_group(self, group: int) -> None:
        """Watch the processes of the group led by ``group`` from now on."""
        with self._lock:
            self._groups.add(group)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling after one last scan."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.scan()

    def alive(self, pid: int) -> bool:
        """True if the watch last saw a live process ``pid``."""
        with self._lock:
            return any(key[0] == pid for key in self._live)

    def snapshot(self) -> list[ProcessLife]:
        """Return a copy of every life noted so far."""
        with self._lock:
            return [ProcessLife(**life.to_json()) for life in self.lives]

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.scan()

    def scan(self) -> None:
        """Look at ``/proc`` once and note births and deaths."""
        now = time.time()
        with self._lock:
            groups = set(self._groups)
        seen: dict[tuple[int, int], int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            stat = process_stat(int(entry))
            if stat is None:
                continue
            state, group, started = stat
            if group in groups and state not in ("Z", "X"):
                seen[(int(entry), started)] = group
        with self._lock:
            for key, group in seen.items():
                if key not in self._live:
                    life = ProcessLife(key[0], group, key[1], now)
                    self._live[key] = life
                    self.lives.append(life)
            for key in [k for k in self._live if k not in seen]:
                self._live.pop(key).gone_at = now


def process_stat(pid: int | str) -> tuple[str, int, int] | None:
    """Return (state, process group, start time) of ``pid``, or None if gone.

    The start time is in clock ticks since boot; ``"self"`` names the caller.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None
