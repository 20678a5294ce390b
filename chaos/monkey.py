"""The chaos itself: random SIGKILLs, pauses and SIGTERMs, and the restarts.

The monkey acts on one worker at a time, at random moments (a gap drawn from
``gap`` seconds after the previous action), and only while at least two
workers are up, so that one healthy worker is always left to detect and take
over. Kinds come from a shuffled bag of the four kinds, so that each kind is
drawn equally often over a run:

- ``kill``: SIGKILL of the main process (its pool processes die with it);
- ``term``: SIGTERM, a warm shutdown; a worker still alive after
  :data:`TERM_TIMEOUT` seconds has its process group killed;
- ``pause-short``: SIGSTOP, then SIGCONT after 0.2 to 1.2 intervals, shorter
  than the detection bound of 1.5 intervals;
- ``pause-long``: SIGSTOP, then SIGCONT after 2 to 8 intervals.

A pause stops either the main process only (its pool processes run on, as when
only the worker's main loop hangs) or the whole process group (as when the
machine or container freezes), half the time each. A worker that died (killed,
or exited after SIGTERM) is replaced by a new worker, under a new node name,
:data:`RESTART_DELAY` seconds later.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from harness import Worker

from .workers import ChaosCluster, ProcessWatch

#: The kinds of disruption, drawn from a shuffled bag.
KINDS = ("kill", "term", "pause-short", "pause-long")

#: A short pause lasts this many intervals (shorter than the detection bound).
SHORT_PAUSE = (0.2, 1.2)
#: A long pause lasts this many intervals.
LONG_PAUSE = (2.0, 8.0)
#: Seconds from a worker's death to the start of its replacement.
RESTART_DELAY = (0.5, 3.0)
#: Seconds a worker may take to exit after SIGTERM before its group is killed.
TERM_TIMEOUT = 30.0
#: Starts tried for one replacement before the run gives that one up.
RESTART_TRIES = 3


@dataclass
class Disruption:
    """One thing the monkey did to a worker.

    Attributes:
        worker: The node name of the worker.
        kind: ``kill``, ``term`` or ``stop``.
        at: When the signal was sent (epoch seconds).
        until: For a stop, when SIGCONT was sent; for a kill or a term, when
            the main process was seen gone; None until then.
        target: For a stop, ``main`` (main process only) or ``group``.
        planned: For a stop, the planned length in seconds.
    """

    worker: str
    kind: str
    at: float
    until: float | None = None
    target: str = "main"
    planned: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


@dataclass
class Incarnation:
    """One worker process from its start to its end."""

    worker: Worker
    spawned: float
    ready: float | None = None
    exited: float | None = None
    state: str = "starting"  # starting, up, stopped, terming, killed, dead

    def to_json(self) -> dict[str, Any]:
        """Return what the analysis needs, as a JSON-ready dict."""
        return {
            "name": self.worker.name,
            "pid": self.worker.pid,
            "log": str(self.worker.log_path),
            "spawned": self.spawned,
            "ready": self.ready,
            "exited": self.exited,
        }


@dataclass
class Monkey:
    """Disrupts workers at random and keeps ``count`` of them running."""

    cluster: ChaosCluster
    watch: ProcessWatch
    rng: random.Random
    interval: float
    count: int
    concurrency: int
    gap: tuple[float, float]
    say: Callable[[str], None]
    disruptions: list[Disruption] = field(default_factory=list)
    incarnations: list[Incarnation] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    restarts: int = 0
    acting: bool = False
    _bag: list[str] = field(default_factory=list)
    _next_action: float = 0.0
    _resume_at: dict[str, tuple[float, Disruption]] = field(default_factory=dict)
    _pending: dict[str, tuple[float, Disruption]] = field(default_factory=dict)
    _restart_due: list[float] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- starting workers --------------------------------------------------

    def start_workers(self) -> None:
        """Start the first ``count`` workers and wait until each answers a ping."""
        threads = [self._restart_thread() for _ in range(self.count)]
        for thread in threads:
            thread.join(timeout=120)
        if self.up_count() < self.count:
            raise RuntimeError(
                f"only {self.up_count()} of {self.count} workers started: "
                + "; ".join(self.failures)
            )

    def _restart_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._start_one, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _start_one(self) -> None:
        for _ in range(RESTART_TRIES):
            worker = self.cluster.spawn(self.concurrency)
            self.watch.add_group(worker.pid)
            life = Incarnation(worker, spawned=time.time())
            with self._lock:
                self.incarnations.append(life)
            try:
                self.cluster.wait_ready(worker)
            except AssertionError as exc:
                first = str(exc).splitlines()[0]
                self._note(f"{worker.name} did not start: {first}")
                worker.destroy()
                with self._lock:
                    life.state, life.exited = "dead", time.time()
                continue
            with self._lock:
                life.ready = time.time()
                life.state = "up"
            return

    # -- the loop ----------------------------------------------------------

    def begin(self) -> None:
        """Start acting from now on."""
        self.acting = True
        self._next_action = time.time() + self.rng.uniform(*self.gap)

    def step(self) -> None:
        """Do whatever is due now: resumes, reaping, restarts, the next action."""
        now = time.time()
        for name, (due, disruption) in list(self._resume_at.items()):
            if now >= due:
                self._resume(name, disruption)
        self._reap(now)
        for due in [d for d in self._restart_due if d <= now]:
            self._restart_due.remove(due)
            self.restarts += 1
            self._restart_thread()
        if self.acting and now >= self._next_action:
            self._act()

    def _act(self) -> None:
        with self._lock:
            up = [life for life in self.incarnations if life.state == "up"]
        if len(up) < 2:
            self._next_action = time.time() + 0.5
            return
        if not self._bag:
            self._bag = list(KINDS)
            self.rng.shuffle(self._bag)
        kind = self._bag.pop()
        life = self.rng.choice(up)
        worker = life.worker
        if kind == "kill":
            disruption = Disruption(worker.name, "kill", worker.kill())
            life.state = "killed"
            self._pending[worker.name] = (float("inf"), disruption)
            detail = ""
        elif kind == "term":
            disruption = Disruption(worker.name, "term", worker.signal(signal.SIGTERM))
            life.state = "terming"
            self._pending[worker.name] = (disruption.at + TERM_TIMEOUT, disruption)
            detail = ""
        else:
            bounds = SHORT_PAUSE if kind == "pause-short" else LONG_PAUSE
            planned = self.rng.uniform(*bounds) * self.interval
            target = self.rng.choice(("main", "group"))
            if target == "main":
                at = worker.stop()
            else:
                os.killpg(worker.pid, signal.SIGSTOP)
                at = time.time()
                worker.stopped = True
            disruption = Disruption(worker.name, "stop", at, None, target, planned)
            life.state = "stopped"
            self._resume_at[worker.name] = (at + planned, disruption)
            detail = f" ({target}, {planned:.2f} s)"
        self.disruptions.append(disruption)
        self.say(f"{kind} {worker.name}{detail}")
        self._next_action = time.time() + self.rng.uniform(*self.gap)

    def _resume(self, name: str, disruption: Disruption) -> None:
        del self._resume_at[name]
        life = self._life(name)
        if disruption.target == "main":
            disruption.until = life.worker.resume()
        else:
            try:
                os.killpg(life.worker.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            disruption.until = time.time()
            life.worker.stopped = False
        if life.state == "stopped":
            life.state = "up"

    def _reap(self, now: float) -> None:
        for name, (deadline, disruption) in list(self._pending.items()):
            life = self._life(name)
            if life.worker.process.poll() is not None:
                del self._pending[name]
                disruption.until = life.exited = time.time()
                life.state = "dead"
                self._restart_due.append(now + self.rng.uniform(*RESTART_DELAY))
            elif now >= deadline:
                self._note(
                    f"{name} was still alive {TERM_TIMEOUT:.0f} s after SIGTERM; "
                    "its process group is killed"
                )
                try:
                    os.killpg(life.worker.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._pending[name] = (float("inf"), disruption)

    # -- the end -------------------------------------------------------------

    def finish(self, timeout: float) -> None:
        """Stop acting, resume every paused worker and bring ``count`` back up.

        Waits at most ``timeout`` seconds for terminating workers to exit and
        for replacements to answer.
        """
        self.acting = False
        for name, (_, disruption) in list(self._resume_at.items()):
            self._resume(name, disruption)
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._restart_due = [time.time()] * len(self._restart_due)
            self.step()
            with self._lock:
                starting = any(i.state == "starting" for i in self.incarnations)
            if not self._pending and not self._restart_due and not starting:
                missing = self.count - self.up_count()
                if missing <= 0:
                    return
                for _ in range(missing):
                    self.restarts += 1
                    self._restart_thread()
            time.sleep(0.1)
        self._note(f"only {self.up_count()} workers were up {timeout:.0f} s after")

    def resume_all(self) -> None:
        """SIGCONT every worker paused now (on any exit path)."""
        for name, (_, disruption) in list(self._resume_at.items()):
            self._resume(name, disruption)

    def up_count(self) -> int:
        """How many workers are up (started, not paused, not leaving)."""
        with self._lock:
            return sum(1 for life in self.incarnations if life.state == "up")

    def _life(self, name: str) -> Incarnation:
        with self._lock:
            return next(i for i in self.incarnations if i.worker.name == name)

    def _note(self, text: str) -> None:
        with self._lock:
            self.failures.append(text)
        self.say(f"note: {text}")
