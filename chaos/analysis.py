"""The figures of a chaos run, computed from what the run saved.

Inputs, all in the run folder: ``run.json`` (the jobs, the worker processes,
every disruption, every process the watch saw, the jobs whose messages waited
in the broker at the drain deadline, the final state of each job and its
``celery_turnout.history``), ``records/<job>.jsonl`` (one line per start and
per finish of a copy of a job: job id, attempt, worker, pid, the process's
start time, time) and the worker logs.

The rules, in the order the report prints them:

*Copy.* One start record is one copy of a job. It runs from its start until
the first of: its finish record (same job, attempt and pid); the next start
record of the same process (the process moved on); the death of its process,
as the process watch saw it (to within one poll, a quarter second). A copy
with none of these still runs at the end of the run. A record names its
process by pid and start time; a process the watch never saw (one that lived
less than a poll, or a record without a start time that the watch saw only
later) leaves its copy *unwatched*: only a record can end it, else the death
of its worker's main process or the end of the run bounds it from above.

*Completed.* The job's result in the backend is ``SUCCESS``.

*Held unstarted.* Not completed, no copy of it runs at the drain deadline, and
its latest attempt (the highest in its history) was admitted by a worker (a
``started`` event) that was alive at the deadline, with no later event of that
attempt but ``covered``, and without a start record of that attempt by the
deadline: the job waits in that worker's reserve for a pool process.

*Waiting in the broker.* Not completed, not running, not held unstarted, and
a message of the job was in the run's task queue at the deadline (on Redis,
also one taken but not acknowledged, which the broker returns after the
visibility timeout).

*Lost.* Not completed and ended otherwise (``FAILURE``, ``REVOKED``), or
neither running, held unstarted nor waiting in the broker at the deadline. A
run saved without a record of what waited in the broker counts the jobs that
waited there as lost, and its report says so.

*Completed more than once.* A copy's outcome is *kept* when the copy wrote a
finish record and either its completion claim succeeded (a ``finished`` event
of its attempt in the job's history) or its worker logged that it stored the
outcome just as a newer attempt took over (the one case in which an outcome
reaches the backend without a completion claim). A job is completed more than
once when outcomes of two or more different attempts were kept; outcomes that
turnout dropped (``Ignore``: superseded) never count.

*Concurrent copies.* Two copies of a job overlap when one starts before the
other ended. The report gives the most copies of one job that ran at one time.

*Fenced overlap.* An overlap of a copy A of attempt a (on worker W) and a
copy B of a later attempt b is fenced when W was disrupted between
:data:`WINDOW` intervals before the first of the two starts and the second
start (SIGKILLed or SIGTERMed at any time before, or paused by a SIGSTOP that
lasted into that window), or W obeyed a fence notice for attempt a (a
``fenced`` event of attempt a by W in the history). Any other overlap, and any
overlap of two copies of the same attempt, is unfenced: two copies ran at once
with no reason to presume the older one dead.

*Late start.* A fenced overlap in which A started after B: a superseded
attempt that began running although a later one already ran. It is fenced by
the rule above, and counted apart.

*Fence lag.* For a fenced overlap, how long A ran on after the later of the
second start and the moment W could act again (its resume for a pause, the
signal for a kill or term, the fence event otherwise), less the time W was
paused again in between. Above one interval plus
:data:`FENCE_SLACK` seconds the fence was slow: the README promises that a
paused owner stops its copy at most one interval after it resumes. When A is
unwatched and no record ends it, its end is unknown, and so is the lag: the
overlap is counted apart and has no lag.

*False takeover.* A ``taken_over`` event whose lost worker was neither killed
nor terminated before it, nor paused at some moment in the :data:`WINDOW`
intervals before it.

*Takeover latency.* For each first takeover of an attempt explained by a
disruption: from the signal (the SIGKILL, the SIGTERM, or the SIGSTOP that
began the pause) to the first start of that attempt or a later one, in
supervise intervals. Hand-offs (SIGTERM) are given separately. When jobs wait
in the queue or in a worker's reserve for a free pool process, this includes
the wait. *Detection latency*, per disruption followed by a takeover of its
worker: from the signal to the first re-dispatch (``taken_over`` event) it
explains; it does not include the wait.

*Revoked.* ``revoked`` events in a history: the run never revokes a job, so
each one is a copy that Celery reported as revoked on its own.

*Most jobs held.* The largest job count in a worker's "takes over its N
job(s)" or "handing off N turnout job(s)" log line: how many jobs one worker
had reserved at once.

*Missed takeover.* A pause longer than the detection bound plus one second of
a worker that held a copy started at least one interval before the pause and
running until at least the detection bound plus one second into it, and not
taken over already before the pause, with no takeover of that worker by two
intervals after the resume.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Intervals before a takeover (or before an older copy's start) in which a
#: disruption of its worker explains it: the detection bound (1.5 intervals)
#: plus a late check's allowance.
WINDOW = 4.0

#: Seconds, on top of one interval, a fenced copy may run on after its worker
#: can act again: the main thread's step period, a kill and one watch poll.
FENCE_SLACK = 1.0

#: How many cases of each problem the report lists.
SHOWN = 10

#: Final states of a job that will never complete.
ENDED = ("FAILURE", "REVOKED")

#: History events that leave a worker holding the attempt it admitted.
STILL_HELD = ("started", "covered")

#: The worker log lines that tell what happened to a finished copy's outcome.
DROPPED = re.compile(r"Job (\S+) attempt (\d+) ended on (\S+) after a newer attempt")
HELD = re.compile(r"takes over its (\d+) job|handing off (\d+) turnout job")
STORED_LATE = re.compile(r"Job (\S+) attempt (\d+) stored its outcome on (\S+) just")


@dataclass
class Copy:
    """One run of one attempt of a job in one process."""

    job: str
    attempt: int
    worker: str
    pid: int
    start: float
    end: float | None
    how: str
    #: False when the process watch never saw the copy's process.
    watched: bool = True

    def until(self, horizon: float) -> float:
        """The copy's end, or ``horizon`` if it still runs."""
        return horizon if self.end is None else self.end

    @property
    def end_known(self) -> bool:
        """True when a record or the process watch tells when the copy ended."""
        return self.watched or self.how in ("finished", "moved on")

    def label(self) -> str:
        """A short description for the report."""
        end = "running" if self.end is None else f"{self.end:.2f}"
        unwatched = "" if self.watched else ", pid never seen by the watch"
        return (
            f"attempt {self.attempt} on {self.worker} pid {self.pid} "
            f"[{self.start:.2f} - {end} {self.how}{unwatched}]"
        )


@dataclass
class Overlap:
    """Two copies of one job that ran at the same time."""

    older: Copy
    newer: Copy
    fenced: bool
    why: str
    lag: float | None


@dataclass
class Takeover:
    """One ``taken_over`` or ``handed_off`` event of a job's history."""

    job: str
    attempt: int
    event: str
    lost: str
    at: float
    cause: dict[str, Any] | None
    next_start: float | None
    reason: str = ""

    @property
    def latency(self) -> float | None:
        """Seconds from the cause's signal to the next start, if both exist."""
        if self.cause is None or self.next_start is None:
            return None
        return self.next_start - float(self.cause["at"])


@dataclass
class Report:
    """Every figure of a run, and the cases behind the bad ones."""

    header: list[str]
    submitted: int
    completed: int
    lost: list[str]
    running: list[str]
    #: Job -> (the live worker that holds it unstarted, the attempt).
    held: dict[str, tuple[str, int]]
    #: Job -> where its message waited in the broker; None if not recorded.
    waiting: dict[str, str] | None
    failed: list[str]
    doubled: dict[str, list[int]]
    most_copies: int
    overlaps: list[Overlap]
    takeovers: list[Takeover]
    handoffs: list[Takeover]
    interval: float
    pauses: dict[str, int]
    missed: list[str]
    orphans: list[str]
    revoked: list[str]
    most_held: int
    notes: list[str]
    details: list[str] = field(default_factory=list)

    @property
    def unfenced(self) -> list[Overlap]:
        """The overlaps that were not fenced."""
        return [o for o in self.overlaps if not o.fenced]

    @property
    def late_starts(self) -> list[Overlap]:
        """Fenced overlaps whose older attempt started after the newer one."""
        return [o for o in self.overlaps if o.fenced and o.older.start > o.newer.start]

    @property
    def false_takeovers(self) -> list[Takeover]:
        """The takeovers that no disruption explains."""
        return [t for t in self.takeovers if t.cause is None]

    @property
    def unknown_lags(self) -> list[Overlap]:
        """Fenced overlaps whose older copy's end, and so its lag, is unknown."""
        return [o for o in self.overlaps if o.fenced and not o.older.end_known]

    @property
    def ok(self) -> bool:
        """True when no job was lost and no unfenced concurrent copies ran."""
        return not self.lost and not self.unfenced

    def lines(self) -> list[str]:
        """The report, one printable line each."""
        i = self.interval
        lags = [o.lag for o in self.overlaps if o.fenced and o.lag is not None]
        slow = [x for x in lags if x > i + FENCE_SLACK]
        jobs_overlapping = len({o.older.job for o in self.overlaps})
        out = list(self.header)
        out += [
            f"jobs submitted: {self.submitted}",
            f"completed: {self.completed}",
            f"lost: {len(self.lost)}",
            f"still running at the drain deadline: {len(self.running)}",
            f"held unstarted by a live worker at the drain deadline: "
            f"{len(self.held)}{_by_worker(self.held)}",
            "waiting in the broker at the drain deadline: "
            + ("not recorded by this run" if self.waiting is None
               else str(len(self.waiting))),
            f"ended FAILURE: {len(self.failed)}",
            f"completed more than once: {len(self.doubled)}",
            f"most copies of one job at the same time: {self.most_copies} "
            f"({len(self.overlaps)} overlaps in {jobs_overlapping} jobs)",
            f"unfenced overlaps: {len(self.unfenced)}",
            f"superseded attempts that started after their successor: "
            f"{len(self.late_starts)}",
            f"fence lag: max {_fmt(max(lags, default=None), i)} intervals; "
            f"slow fences (> 1 interval + {FENCE_SLACK:g} s): {len(slow)}; "
            f"unknown (copy's process never seen): {len(self.unknown_lags)}",
            f"takeovers: {len(self.takeovers)} (of {_checks(self.takeovers)} "
            f"workers' ticks), false takeovers: {len(self.false_takeovers)} (of "
            f"{_checks(self.false_takeovers)} ticks); hand-offs: "
            f"{len(self.handoffs)}",
            "detection latency (signal to first re-dispatch, intervals): "
            + _percentiles(_detections(self.takeovers), i),
            "takeover latency (signal to next attempt's start, intervals): "
            + _percentiles([t.latency for t in _first(self.takeovers)], i),
            "  after SIGKILL: "
            + _percentiles(_latencies(self.takeovers, "kill"), i)
            + "; after SIGSTOP: "
            + _percentiles(_latencies(self.takeovers, "stop"), i),
            "hand-off latency (SIGTERM to next attempt's start, intervals): "
            + _percentiles([t.latency for t in _first(self.handoffs)], i),
            "pauses: {short} shorter than 1.5 intervals ({short_taken} followed "
            "by a takeover), {long} longer ({long_taken} followed by a takeover, "
            "{missed} missed)".format(missed=len(self.missed), **self.pauses),
            f"pool processes outliving their main process by > 2 s: "
            f"{len(self.orphans)}",
            f"copies reported revoked (no revoke was sent): {len(self.revoked)}",
            f"most jobs held by one worker at once: {self.most_held}",
        ]
        for note in self.notes:
            out.append(f"note: {note}")
        out += self.details
        return out


def analyze(directory: Path) -> Report:
    """Compute the report of the run saved in ``directory``."""
    data = json.loads((directory / "run.json").read_text())
    records = read_records(directory / "records")
    logs = [Path(w["log"]) for w in data["workers"]]
    return compute(data, records, _log_text(logs))


def compute(
    data: dict[str, Any], records: Sequence[dict[str, Any]], log: str
) -> Report:
    """Compute the report from the saved run data, the records and the logs."""
    config = data["config"]
    interval = float(config["interval"])
    horizon = float(data["horizon"])
    history: dict[str, list[dict[str, Any]]] = data["history"]
    states: dict[str, str] = data["states"]
    disruptions = sorted(data["disruptions"], key=lambda d: d["at"])
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for disruption in disruptions:
        by_worker[disruption["worker"]].append(disruption)

    copies = build_copies(records, data["processes"], data["workers"])
    per_job: dict[str, list[Copy]] = defaultdict(list)
    for copy in copies:
        per_job[copy.job].append(copy)

    def explain(worker: str, since: float, before: float) -> dict[str, Any] | None:
        """The last disruption of ``worker`` sent by ``before`` lasting to ``since``."""
        for d in reversed(by_worker.get(worker, [])):
            if d["at"] > before:
                continue
            lasted = d["until"] if d["kind"] == "stop" else math.inf
            if lasted is None or lasted >= since:
                return d
        return None

    def paused(worker: str, start: float, end: float) -> float:
        """Seconds within [start, end] in which ``worker`` was stopped."""
        total = 0.0
        for d in by_worker.get(worker, []):
            if d["kind"] == "stop":
                until = d["until"] if d["until"] is not None else end
                total += max(0.0, min(end, until) - max(start, d["at"]))
        return total

    jobs = [j["id"] for j in data["jobs"]]
    running = sorted(
        j for j in data["running_at_end"] if states.get(j) != "SUCCESS"
    )
    drained = float(data["drained"])
    alive = {
        w["name"] for w in data["workers"]
        if w["spawned"] <= drained and (w["exited"] is None or w["exited"] > drained)
    }
    in_broker: dict[str, str] | None = data.get("waiting_at_end")
    held: dict[str, tuple[str, int]] = {}
    waiting: dict[str, str] = {}
    lost = []
    for job in jobs:
        state = states.get(job)
        if state == "SUCCESS" or job in running:
            continue
        holder = None
        if state not in ENDED:
            holder = held_unstarted(history.get(job, []), per_job[job], alive, drained)
        if holder is not None:
            held[job] = holder
        elif state not in ENDED and in_broker is not None and job in in_broker:
            waiting[job] = in_broker[job]
        else:
            lost.append(job)
    failed = [j for j in jobs if states.get(j) == "FAILURE"]

    # Completed more than once.
    late = {(m[0], int(m[1])) for m in STORED_LATE.findall(log)}
    doubled: dict[str, list[int]] = {}
    for job in jobs:
        finished = {c.attempt for c in per_job[job] if c.how == "finished"}
        claimed = {e["attempt"] for e in history.get(job, [])
                   if e["event"] == "finished"}
        kept = sorted(a for a in finished if a in claimed or (job, a) in late)
        if len(kept) > 1:
            doubled[job] = kept

    # Concurrent copies and overlaps.
    most = 0
    overlaps: list[Overlap] = []
    for job, job_copies in per_job.items():
        most = max(most, _most_at_once(job_copies, horizon))
        fences = {(e["attempt"], e["worker"]): float(e["at"])
                  for e in history.get(job, []) if e["event"] == "fenced"}
        ordered = sorted(job_copies, key=lambda c: c.start)
        for n, older in enumerate(ordered):
            for newer in ordered[n + 1:]:
                if newer.start >= older.until(horizon):
                    continue
                overlaps.append(
                    _judge(older, newer, horizon, interval, explain, fences, paused)
                )

    # Takeovers and hand-offs.
    takeovers: list[Takeover] = []
    handoffs: list[Takeover] = []
    for job, events in history.items():
        for e in events:
            if e["event"] not in ("taken_over", "handed_off"):
                continue
            at, lost_worker = float(e["at"]), str(e["worker"])
            cause = explain(lost_worker, at - WINDOW * interval, at)
            starts = [c.start for c in per_job[job]
                      if c.attempt >= e["attempt"] and c.start >= at - 0.5]
            takeover = Takeover(
                job, int(e["attempt"]), e["event"], lost_worker, at, cause,
                min(starts, default=None), str(e.get("reason", "")),
            )
            (takeovers if e["event"] == "taken_over" else handoffs).append(takeover)

    pauses, missed = _pauses(disruptions, copies, takeovers, interval)
    orphans = _orphans(data["processes"], data["workers"])

    report = Report(
        header=_header(data),
        submitted=len(jobs),
        completed=sum(1 for j in jobs if states.get(j) == "SUCCESS"),
        lost=lost,
        running=running,
        held=held,
        waiting=None if in_broker is None else waiting,
        failed=failed,
        doubled=doubled,
        most_copies=most,
        overlaps=overlaps,
        takeovers=takeovers,
        handoffs=handoffs,
        interval=interval,
        pauses=pauses,
        missed=missed,
        orphans=orphans,
        revoked=[
            f"{job} attempt {e['attempt']} on {e['worker']} at {e['at']:.2f}"
            for job, events in history.items() for e in events
            if e["event"] == "revoked"
        ],
        most_held=max(
            (int(a or b) for a, b in HELD.findall(log)), default=0
        ),
        notes=list(data.get("failures", [])) + (
            ["this run did not record what waited in the broker at the drain "
             "deadline: a job that waited there counts as lost"]
            if in_broker is None else []
        ),
    )
    report.details = _details(report, per_job, history, states)
    return report


def build_copies(
    records: Sequence[dict[str, Any]],
    processes: Sequence[dict[str, Any]],
    workers: Sequence[dict[str, Any]],
) -> list[Copy]:
    """Turn start and finish records into copies with their ends (see module doc)."""
    lives: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for process in processes:
        lives[int(process["pid"])].append(process)
    starts_by_pid: dict[int, list[float]] = defaultdict(list)
    finishes: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for r in records:
        if r["event"] == "start":
            starts_by_pid[int(r["pid"])].append(float(r["time"]))
        elif r["event"] == "finish":
            finishes[(r["job"], int(r["attempt"]), int(r["pid"]))].append(r["time"])
    exited = {w["name"]: w["exited"] for w in workers}

    copies = []
    for r in records:
        if r["event"] != "start":
            continue
        pid, start = int(r["pid"]), float(r["time"])
        life = _life_of(lives.get(pid, []), r.get("process_start"), start)
        ends: list[tuple[float, str]] = []
        done = [t for t in finishes[(r["job"], int(r["attempt"]), pid)] if t >= start]
        if done:
            ends.append((min(done), "finished"))
        gone = life["gone_at"] if life is not None else None
        later = [t for t in starts_by_pid[pid]
                 if t > start and (gone is None or t <= gone)]
        if later:
            ends.append((min(later), "moved on"))
        if gone is not None:
            ends.append((float(gone), "died"))
        if life is None and exited.get(r["worker"]) is not None:
            ends.append((float(exited[r["worker"]]), "worker gone"))
        end, how = min(ends) if ends else (None, "running")
        if life is None and not ends:
            how = "unknown"
        copies.append(Copy(
            r["job"], int(r["attempt"]), r["worker"], pid, start, end, how,
            watched=life is not None,
        ))
    return copies


def _life_of(
    lives: Iterable[dict[str, Any]], process_start: int | None, at: float
) -> dict[str, Any] | None:
    """The watch's life of the process that wrote a record at ``at``, if seen."""
    if process_start is not None:
        return next((x for x in lives if x["started"] == process_start), None)
    # Older records name the pid only: take the life the pid had at that time.
    for life in sorted(lives, key=lambda x: x["first_seen"]):
        # The watch may first see a process a poll after it wrote a record.
        if life["first_seen"] <= at + 1.0 and (
            life["gone_at"] is None or life["gone_at"] >= at
        ):
            return life
    return None


def _most_at_once(copies: Sequence[Copy], horizon: float) -> int:
    points = []
    for c in copies:
        points.append((c.start, 1))
        points.append((c.until(horizon), -1))
    # At equal times, an end comes before a start.
    points.sort()
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


def _judge(
    first: Copy, second: Copy, horizon: float, interval: float, explain: Any,
    fences: dict[tuple[int, str], float],
    paused: Callable[[str, float, float], float] = lambda *_: 0.0,
) -> Overlap:
    """Judge the overlap of two copies of a job, ``first`` started first.

    The fence lag leaves out the time the older copy's worker was paused
    again after it could act: a stopped worker cannot stop a copy.
    """
    if first.attempt == second.attempt:
        return Overlap(first, second, False, "two copies of one attempt", None)
    older, newer = sorted((first, second), key=lambda c: c.attempt)
    since = first.start - WINDOW * interval
    cause = explain(older.worker, since, second.start)
    fence = fences.get((older.attempt, older.worker))
    if cause is None and fence is None:
        return Overlap(older, newer, False, "worker neither disrupted nor fenced", None)
    if cause is not None:
        free = cause["until"] if cause["kind"] == "stop" else cause["at"]
        why = f"{cause['kind']} at {cause['at']:.2f}"
        if cause["kind"] == "stop":
            why += f" ({cause['target']}, until {cause['until']:.2f})"
    else:
        free, why = fence, "fence notice obeyed"
    if not older.end_known:
        return Overlap(older, newer, True, why, None)
    could_act = max(second.start, float(free or horizon))
    end = older.until(horizon)
    lag = end - could_act - paused(older.worker, could_act, end)
    return Overlap(older, newer, True, why, lag)


def held_unstarted(
    events: Sequence[dict[str, Any]], copies: Sequence[Copy], alive: set[str],
    deadline: float,
) -> tuple[str, int] | None:
    """The live worker holding a job's latest attempt unstarted, and the attempt.

    See *Held unstarted* in the module doc; None when the job is not so held.
    """
    latest = max((int(e["attempt"]) for e in events), default=0)
    admitted = [e for e in events
                if e["event"] == "started" and int(e["attempt"]) == latest]
    if not admitted:
        return None
    last = max(admitted, key=lambda e: float(e["at"]))
    worker = str(last["worker"])
    released = any(
        e["event"] not in STILL_HELD and int(e["attempt"]) == latest
        and float(e["at"]) >= float(last["at"])
        for e in events
    )
    started = any(c.attempt == latest and c.start <= deadline for c in copies)
    if released or started or worker not in alive:
        return None
    return worker, latest


def _pauses(
    disruptions: Sequence[dict[str, Any]],
    copies: Sequence[Copy],
    takeovers: Sequence[Takeover],
    interval: float,
) -> tuple[dict[str, int], list[str]]:
    bound = 1.5 * interval + 1.0
    counts = {"short": 0, "short_taken": 0, "long": 0, "long_taken": 0}
    missed = []
    for d in disruptions:
        if d["kind"] != "stop" or d["until"] is None:
            continue
        kind = "short" if d["planned"] < 1.5 * interval else "long"
        counts[kind] += 1
        after = d["until"] + 2 * interval
        taken = [t for t in takeovers
                 if t.lost == d["worker"] and d["at"] <= t.at <= after]
        if taken:
            counts[f"{kind}_taken"] += 1
            continue
        if d["until"] - d["at"] < bound:
            continue
        # A copy whose job was already taken over by a later attempt has
        # nothing left to take over.
        held = [c for c in copies if c.worker == d["worker"]
                and c.start <= d["at"] - interval
                and (c.end is None or c.end >= d["at"] + bound)
                and not any(t.job == c.job and t.attempt > c.attempt
                            and t.at <= d["at"] for t in takeovers)]
        if held:
            missed.append(
                f"pause of {d['worker']} ({d['target']}) {d['at']:.2f} - "
                f"{d['until']:.2f} held {', '.join(c.job for c in held)}; "
                "no takeover followed"
            )
    return counts, missed


def _orphans(
    processes: Sequence[dict[str, Any]], workers: Sequence[dict[str, Any]]
) -> list[str]:
    exited = {w["pid"]: (w["name"], w["exited"]) for w in workers}
    found = []
    for life in processes:
        name, gone = exited.get(life["group"], (None, None))
        if gone is None or life["pid"] == life["group"]:
            continue
        outlived = (life["gone_at"] or math.inf) - gone
        if outlived > 2.0:
            found.append(f"pid {life['pid']} of {name} outlived it by {outlived:.1f} s")
    return found


def _detections(takeovers: Iterable[Takeover]) -> list[float | None]:
    """Per disruption that explains takeovers: seconds to the first of them."""
    first: dict[tuple[str, float], float] = {}
    for t in takeovers:
        if t.cause is not None and t.cause["kind"] in ("kill", "stop"):
            key = (t.cause["worker"], float(t.cause["at"]))
            first[key] = min(first.get(key, math.inf), t.at - key[1])
    return list(first.values())


def _checks(takeovers: Iterable[Takeover]) -> int:
    """How many distinct checks (lost worker and reason) made these takeovers."""
    return len({(t.lost, t.reason) for t in takeovers})


def _first(takeovers: Iterable[Takeover]) -> list[Takeover]:
    seen: set[tuple[str, int]] = set()
    first = []
    for t in sorted(takeovers, key=lambda t: t.at):
        if (t.job, t.attempt) not in seen:
            seen.add((t.job, t.attempt))
            first.append(t)
    return first


def _latencies(takeovers: Iterable[Takeover], kind: str) -> list[float | None]:
    return [
        t.latency for t in _first(takeovers)
        if t.cause is not None and t.cause["kind"] == kind
    ]


def _percentiles(values: Iterable[float | None], interval: float) -> str:
    known = sorted(v / interval for v in values if v is not None)
    if not known:
        return "none"

    def rank(q: float) -> float:
        return known[max(0, math.ceil(q * len(known)) - 1)]

    return (
        f"p50 {rank(0.5):.2f}, p95 {rank(0.95):.2f}, max {known[-1]:.2f} "
        f"(n={len(known)})"
    )


def _by_worker(held: dict[str, tuple[str, int]]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for worker, _ in held.values():
        counts[worker] += 1
    if not counts:
        return ""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return " (" + ", ".join(f"{w}: {n}" for w, n in ordered) + ")"


def _fmt(value: float | None, interval: float) -> str:
    return "-" if value is None else f"{value / interval:.2f}"


def _header(data: dict[str, Any]) -> list[str]:
    c = data["config"]
    kinds: dict[str, int] = defaultdict(int)
    for d in data["disruptions"]:
        kinds[d["kind"] if d["kind"] != "stop" else f"stop-{d['target']}"] += 1
    restarted = len(data["workers"]) - int(c["workers"])
    return [
        f"command: {data['command']}",
        f"code: {data['code']}; run folder: {data['directory']}; seed {c['seed']}",
        f"broker {c['broker']}, {c['minutes']:g} min of chaos, {c['workers']} "
        f"workers x {c['concurrency']} pool processes, interval {c['interval']:g} s, "
        f"jobs of {c['shortest']:g}-{c['longest']:g} s",
        "disruptions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + f"; workers started after the first {c['workers']}: {restarted}",
        f"drain: {data['drained'] - data['chaos_to']:.0f} s after the chaos "
        f"stopped (deadline {c['drain_seconds']:g} s)",
    ]


def _details(
    report: Report,
    per_job: dict[str, list[Copy]],
    history: dict[str, list[dict[str, Any]]],
    states: dict[str, str],
) -> list[str]:
    out: list[str] = []

    def job_story(job: str) -> None:
        for c in sorted(per_job.get(job, []), key=lambda c: c.start):
            out.append(f"    copy {c.label()}")
        for e in history.get(job, []):
            extra = {k: v for k, v in e.items() if k not in ("event", "at", "attempt")}
            out.append(f"    {e['at']:.2f} {e['event']} attempt {e['attempt']} {extra}")

    for job in report.lost[:SHOWN]:
        out.append(f"LOST {job} (state {states.get(job)})")
        job_story(job)
    for job, (worker, attempt) in list(report.held.items())[:SHOWN]:
        out.append(
            f"HELD UNSTARTED {job} attempt {attempt} by {worker}, alive at the "
            "drain deadline; no pool process had started it"
        )
    for job, where in list((report.waiting or {}).items())[:SHOWN]:
        out.append(f"WAITING IN THE BROKER {job} ({where})")
        job_story(job)
    for job, attempts in list(report.doubled.items())[:SHOWN]:
        out.append(f"COMPLETED MORE THAN ONCE {job}: attempts {attempts}")
        job_story(job)
    for o in report.unfenced[:SHOWN]:
        out.append(
            f"UNFENCED {o.older.job}: {o.older.label()} and {o.newer.label()}: "
            f"{o.why}"
        )
        job_story(o.older.job)
    for o in report.late_starts[:SHOWN]:
        out.append(
            f"LATE START {o.older.job}: {o.older.label()} began after "
            f"{o.newer.label()} ({o.why})"
        )
    for o in report.unknown_lags[:SHOWN]:
        out.append(
            f"FENCE LAG UNKNOWN {o.older.job}: {o.older.label()} next to "
            f"{o.newer.label()} ({o.why}): no record ends the older copy and "
            "the process watch never saw its process"
        )
    for t in report.false_takeovers[:SHOWN]:
        out.append(f"FALSE TAKEOVER {t.job} attempt {t.attempt} of {t.lost} at "
                   f"{t.at:.2f}")
    slow = [o for o in report.overlaps
            if o.fenced and o.lag is not None
            and o.lag > report.interval + FENCE_SLACK]
    for o in slow[:SHOWN]:
        out.append(
            f"SLOW FENCE {o.older.job}: {o.older.label()} ran {o.lag:.2f} s past "
            f"{o.newer.label()} and its worker's release ({o.why})"
        )
    for text in report.missed[:SHOWN]:
        out.append(f"MISSED TAKEOVER {text}")
    for text in report.orphans[:SHOWN]:
        out.append(f"ORPHAN {text}")
    for text in report.revoked[:SHOWN]:
        out.append(f"REVOKED {text}")
    return out


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Return every record of every job in ``directory``."""
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        # A line still being written has no newline yet: it is left out.
        complete = path.read_text().rpartition("\n")[0]
        found += [json.loads(line) for line in complete.splitlines() if line.strip()]
    return found


def _log_text(paths: Iterable[Path]) -> str:
    return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())
