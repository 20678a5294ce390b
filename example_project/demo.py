"""Show a long job surviving the death of the worker that runs it.

Run ``python -m example_project.demo [--broker URL] [--no-kill]`` from the top of the
repository. The demo writes the ledger if it is missing, starts two workers A and B,
submits one audit job, kills the main process of the worker that runs it halfway
through, waits for the result, prints the job's timeline and checks the result
against the same audit computed in the demo's own process.

Every worker runs in a session of its own, and the demo kills those process groups
when it ends, however it ends short of being killed itself.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from celery import Celery
from celery.states import READY_STATES
from kombu.utils.url import maybe_sanitize_url

from celery_turnout import history
from example_project import ledger
from example_project.settings import chunk_delay, var_dir

#: The customer the demo audits: the one whose history has every kind of anomaly.
CUSTOMER = 'birch-logistics'

#: What each event of a job's history means, in words; ``killed`` is the demo's own.
EVENT_WORDS = {
    'started': 'attempt {attempt} started on {worker}',
    'covered': "attempt {attempt} covered by {worker}'s supervise messages",
    'killed': '{worker} lost: the demo killed its main process',
    'taken_over': '{by} took the job over from {worker}',
    'fenced': 'attempt {attempt} on {worker} fenced: its result will not count',
    'finished': 'attempt {attempt} finished on {worker}',
    'failed': 'attempt {attempt} failed on {worker}',
    'handed_off': '{worker} handed the job off as it shut down',
    'child_lost': 'the pool process running attempt {attempt} on {worker} died',
}

#: Words for an event that `EVENT_WORDS` does not know.
OTHER_EVENT_WORDS = '{event} (attempt {attempt} on {worker})'

#: Letters of the workers the demo starts.
WORKER_NAMES = ('A', 'B')

#: The top of the repository, where the workers start.
REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    """A worker process that the demo started.

    Attributes:
        name: The letter before the ``@`` in its node name.
        process: The ``celery worker`` main process, leader of its own session.
        log: The file its output goes to.
        node: Its node name, known once it answered a ping.
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    node: str = ''


def main(argv: list[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: Command-line arguments, ``sys.argv[1:]`` when not given.

    Returns:
        The exit status: 0 when the result matches the independent audit.
    """
    parser = argparse.ArgumentParser(
        prog='python -m example_project.demo',
        description='Show a long job surviving the death of its worker.')
    parser.add_argument('--broker', metavar='URL',
                        help='broker URL, e.g. redis://127.0.0.1:6379/0 '
                             '(default: filesystem://, files under var/)')
    parser.add_argument('--no-kill', action='store_true',
                        help='let the job run to the end on its first worker')
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    workers: list[Worker] = []
    try:
        return _run(args.broker, not args.no_kill, workers)
    except KeyboardInterrupt:
        print('\nInterrupted.')
        return 130
    finally:
        _stop(workers)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """Turn a termination signal into an exit that still stops the workers."""
    raise SystemExit(128 + signum)


def _run(broker: str | None, kill: bool, workers: list[Worker]) -> int:
    """Do the demo's steps, appending each worker it starts to ``workers``."""
    app_module = _load_app(broker)
    app: Celery = app_module.app
    path = _ensure_ledger(var_dir() / 'ledger.csv')
    started = time.monotonic()
    expected = ledger.audit_history(ledger.read_ledger(path), CUSTOMER)
    elapsed = time.monotonic() - started
    print(f'Audited {CUSTOMER!r} here, without Celery, in {elapsed:.1f} s: '
          f'{_describe(expected)}.')

    for name in WORKER_NAMES:
        workers.append(_start_worker(name))
    _wait_for_pings(app, workers)

    job = app_module.audit_customer_history.delay(str(path), CUSTOMER)
    duration = expected['rows'] / app_module.CHUNK_ROWS * chunk_delay()
    print(f'\nSubmitted job {job.id}: audit_customer_history({str(path)!r}, '
          f'{CUSTOMER!r}), about {duration:.0f} s of work.')
    owner, started_at = _find_owner(app, job.id, workers)
    print(f'  Its history says it started on {owner.node}.')

    killed = None
    if kill:
        time.sleep(max(0.0, started_at + duration / 2 - time.time()))
        killed = _kill_main_process(owner)
        _report_resume(job, timeout=duration)

    print('Waiting for the result ...')
    value = _wait_for_result(job, timeout=3 * duration + 120)
    _print_timeline(history(app, job.id), killed, job.id)
    return _compare(value, expected)


def _load_app(broker: str | None) -> ModuleType:
    """Import the app module once the environment names the broker."""
    if broker:
        os.environ['EXAMPLE_BROKER_URL'] = broker
    broker = os.environ.get('EXAMPLE_BROKER_URL', 'filesystem://')
    if broker.startswith('filesystem://'):
        # Queues left by an interrupted run would hand the new workers old jobs.
        shutil.rmtree(var_dir() / 'local', ignore_errors=True)

    # Imported only now: the app reads its broker from the environment set above.
    app_module = importlib.import_module('example_project.app')
    print('celery-turnout demo: a long job survives the death of its worker.')
    print(f'Broker: {_masked(broker)}; '
          f'results: {_masked(app_module.app.conf.result_backend)}')
    return app_module


def _masked(url: str) -> str:
    """Hide the password in a URL that has one."""
    return str(maybe_sanitize_url(url)) if '@' in url else url


def _ensure_ledger(path: Path) -> Path:
    """Write the ledger unless an earlier run already did."""
    if path.exists():
        print(f'Ledger: {path} (already written).')
        return path
    print(f'Writing the ledger to {path} ...')
    started = time.monotonic()
    count = ledger.write_ledger(path)
    elapsed = time.monotonic() - started
    print(f'  {count} rows for {len(ledger.CUSTOMERS)} customers in {elapsed:.1f} s.')
    return path


def _describe(summary: Any) -> str:
    """Say in one line what an audit summary holds."""
    if not isinstance(summary, dict):
        return f'not a summary: {summary!r}'
    found = ', '.join(f"{a['kind']} {a['txn_id']}" for a in summary['anomalies'])
    return (f"{summary['rows']} rows, balance {summary['balance_cents']} cents, "
            f"anomalies: {found or 'none'}")


def _start_worker(name: str) -> Worker:
    """Start one prefork worker in a session of its own, logging to var/logs."""
    log = var_dir() / 'logs' / (f'{name}.log')
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(REPOSITORY), env.get('PYTHONPATH', '')) if p)
    level = os.environ.get('EXAMPLE_WORKER_LOGLEVEL', 'INFO')
    command = [sys.executable, '-m', 'celery', '-A', 'example_project.app', 'worker',
               '-P', 'prefork', '-c', '2', '-n', f'{name}@%h', '-l', level]

    with log.open('wb') as out:
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    print(f'Started worker {name}, pid {process.pid}, log {log}.')
    return Worker(name, process, log)


def _wait_for_pings(app: Celery, workers: list[Worker], timeout: float = 90) -> None:
    """Wait until every worker answers a ping, and learn their node names."""
    deadline = time.monotonic() + timeout
    while any(not w.node for w in workers):
        for worker in workers:
            if worker.process.poll() is not None:
                raise SystemExit(f'Worker {worker.name} exited with status '
                                 f'{worker.process.returncode}; see {worker.log}.')
        if time.monotonic() > deadline:
            raise SystemExit(f'The workers did not answer a ping in {timeout:.0f} s.')

        for reply in app.control.ping(timeout=1.0):
            for node in reply:
                for worker in workers:
                    if node.startswith(worker.name + '@') and not worker.node:
                        worker.node = node
                        print(f'  {node} answered a ping.')


def _find_owner(app: Celery, job_id: str, workers: list[Worker],
                timeout: float = 60) -> tuple[Worker, float]:
    """Find the worker that started the job, and when, in the job's history."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in history(app, job_id):
            owner = [w for w in workers if w.node == event['worker']]
            if event['event'] == 'started' and owner:
                return owner[0], float(event['at'])
        time.sleep(0.2)
    raise SystemExit(f'No worker started job {job_id} in {timeout:.0f} s.')


def _kill_main_process(worker: Worker) -> dict[str, Any]:
    """Kill a worker's main process with SIGKILL, as the OOM killer would.

    Returns:
        An event for the timeline that says when and whom.
    """
    os.kill(worker.process.pid, signal.SIGKILL)
    killed = {'event': 'killed', 'worker': worker.node, 'at': time.time()}
    worker.process.wait()
    print(f"Killed {worker.node}'s main process (pid {worker.process.pid}) "
          'with SIGKILL.')
    return killed


def _report_resume(job: Any, timeout: float) -> None:
    """Say from which row the attempt that took the job over resumed, as it reports.

    The job notes it in its progress, which the result backend shows as the meta of
    state PROGRESS (`AsyncResult.info`).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.state not in READY_STATES:
        info = job.info
        note = info.get('note') or '' if isinstance(info, dict) else ''
        if 'resumed at row' in note and (info.get('attempt') or 1) > 1:
            row = note.rpartition('resumed at row ')[2]
            print(f"  Attempt {info['attempt']} took the job over and resumed at row "
                  f'{row}, after the last checkpoint of the lost attempt: the rows '
                  'before it are not audited again.')
            return
        time.sleep(0.2)
    print('  No attempt reported resuming from a checkpoint.')


def _wait_for_result(job: Any, timeout: float) -> Any:
    """Wait for the job's result, or for its error if it failed."""
    try:
        return job.get(timeout=timeout, interval=0.5, propagate=False)
    except Exception as exc:  # The demo reports every way of not getting it.
        return exc


def _print_timeline(events: list[dict[str, Any]], killed: dict[str, Any] | None,
                    job_id: str) -> None:
    """Print what happened to the job, in words, from its history and the kill."""
    events = sorted(events + ([killed] if killed else []), key=lambda e: e['at'])
    if not events:
        print(f'\nJob {job_id} has no history.')
        return

    origin = events[0]['at']
    print(f'\nTimeline of job {job_id}:')
    for event in events:
        words = EVENT_WORDS.get(event['event'], OTHER_EVENT_WORDS)
        offset = event['at'] - origin
        print(f'  {offset:7.1f} s  {words.format_map(_Blank(event))}')
    print(_summarise(events, killed))


class _Blank(dict[str, Any]):
    """An event whose missing fields read as a question mark."""

    def __missing__(self, key: str) -> str:
        return '?'


def _summarise(events: list[dict[str, Any]], killed: dict[str, Any] | None) -> str:
    """Say in one sentence how the job went, as a person would tell it."""
    origin = events[0]['at']
    first = events[0]
    parts = ['Started on {} at 0.0 s'.format(first.get('worker', '?'))]

    takeovers = [e for e in events if e['event'] == 'taken_over']
    if killed:
        parts.append(f"{killed['worker']} lost at {killed['at'] - origin:.1f} s")
        later = [e for e in takeovers if e['at'] >= killed['at']]
        if later:
            delay = later[0]['at'] - killed['at']
            parts.append(f"taken over by {later[0].get('by', '?')} {delay:.1f} s later")
        else:
            parts.append('never taken over')

    ends = [e for e in events if e['event'] in ('finished', 'failed')]
    if ends:
        end = ends[-1]
        parts.append(f"{end['event']} at {end['at'] - origin:.1f} s on "
                     f"{end.get('worker', '?')}")
    else:
        parts.append('not finished')
    attempts = max((int(e.get('attempt') or 0) for e in events), default=0)
    plural = '' if attempts == 1 else 's'
    return f"{'; '.join(parts)}; {attempts} attempt{plural} used."


def _compare(value: Any, expected: dict[str, Any]) -> int:
    """Print the job's result beside the independent audit, and judge it."""
    print(f'\nResult from the workers: {_describe(value)}')
    print(f'Audit computed here:     {_describe(expected)}')
    if value == expected:
        print('The result equals the independent audit.')
        return 0
    print('The result DIFFERS from the independent audit:')
    print(f'  from the workers: {json.dumps(value, sort_keys=True, default=repr)}')
    print(f'  computed here:    {json.dumps(expected, sort_keys=True)}')
    return 1


def _stop(workers: list[Worker]) -> None:
    """Stop every worker the demo started: warm shutdown first, then SIGKILL."""
    if not workers:
        return
    print('Stopping the workers ...')
    started = time.monotonic()
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass

        # Pool processes outlive a main process killed before them; the group
        # holds them all.
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.process.wait()
    print('All workers stopped in %.1f s.' % (time.monotonic() - started))


if __name__ == '__main__':
    sys.exit(main())
