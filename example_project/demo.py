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

from example_project import ledger
from example_project.settings import chunk_delay, var_dir

#: The customer the demo audits: the one whose history has every kind of anomaly.
CUSTOMER = 'birch-logistics'

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
    if broker:
        os.environ['EXAMPLE_BROKER_URL'] = broker
    broker = os.environ.get('EXAMPLE_BROKER_URL', 'filesystem://')
    if broker.startswith('filesystem://'):
        # Queues left by an interrupted run would hand the new workers old jobs.
        shutil.rmtree(var_dir() / 'local', ignore_errors=True)
    # Imported only now: the app reads its broker from the environment set above.
    app_module = importlib.import_module('example_project.app')
    app: Celery = app_module.app
    print('celery-turnout demo: a long job survives the death of its worker.')
    print('Broker: %s; results: %s' % (broker, app.conf.result_backend))

    path = _ensure_ledger(var_dir() / 'ledger.csv')
    started = time.monotonic()
    expected = ledger.audit_history(ledger.read_ledger(path), CUSTOMER)
    print('Audited %r here, without Celery, in %.1f s: %s.'
          % (CUSTOMER, time.monotonic() - started, _describe(expected)))

    for name in WORKER_NAMES:
        workers.append(_start_worker(name))
    _wait_for_pings(app, workers)

    job = app_module.audit_customer_history.delay(str(path), CUSTOMER)
    duration = expected['rows'] / app_module.CHUNK_ROWS * chunk_delay()
    print('\nSubmitted job %s: audit_customer_history(%r, %r), about %.0f s of work.'
          % (job.id, str(path), CUSTOMER, duration))
    owner, started_at = _find_owner(app, app_module, job.id, workers)
    print('  It runs on %s.' % owner.node)

    killed_at = None
    if kill:
        time.sleep(max(0.0, started_at + duration / 2 - time.time()))
        killed_at = _kill_main_process(owner)

    print('Waiting for the result ...')
    value = _wait_for_result(job, timeout=3 * duration + 120)
    _print_timeline(app_module, app, job.id, killed_at, owner)
    return _compare(value, expected)


def _ensure_ledger(path: Path) -> Path:
    """Write the ledger unless an earlier run already did."""
    if path.exists():
        print('Ledger: %s (already written).' % path)
        return path
    print('Writing the ledger to %s ...' % path)
    started = time.monotonic()
    count = ledger.write_ledger(path)
    print('  %d rows for %d customers in %.1f s.'
          % (count, len(ledger.CUSTOMERS), time.monotonic() - started))
    return path


def _describe(summary: Any) -> str:
    """Say in one line what an audit summary holds."""
    if not isinstance(summary, dict):
        return 'not a summary: %r' % (summary,)
    found = ', '.join('%s %s' % (a['kind'], a['txn_id']) for a in summary['anomalies'])
    return '%d rows, balance %d cents, anomalies: %s' % (
        summary['rows'], summary['balance_cents'], found or 'none')


def _start_worker(name: str) -> Worker:
    """Start one prefork worker in a session of its own, logging to var/logs."""
    log = var_dir() / 'logs' / ('%s.log' % name)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(REPOSITORY), env.get('PYTHONPATH', '')) if p)
    command = [sys.executable, '-m', 'celery', '-A', 'example_project.app', 'worker',
               '-P', 'prefork', '-c', '2', '-n', '%s@%%h' % name, '-l', 'INFO']

    with log.open('wb') as out:
        process = subprocess.Popen(command, cwd=REPOSITORY, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    print('Started worker %s, pid %d, log %s.' % (name, process.pid, log))
    return Worker(name, process, log)


def _wait_for_pings(app: Celery, workers: list[Worker], timeout: float = 90) -> None:
    """Wait until every worker answers a ping, and learn their node names."""
    deadline = time.monotonic() + timeout
    while any(not w.node for w in workers):
        for worker in workers:
            if worker.process.poll() is not None:
                raise SystemExit('Worker %s exited with status %s; see %s.'
                                 % (worker.name, worker.process.returncode, worker.log))
        if time.monotonic() > deadline:
            raise SystemExit('The workers did not answer a ping in %.0f s.' % timeout)

        for reply in app.control.ping(timeout=1.0):
            for node in reply:
                for worker in workers:
                    if node.startswith(worker.name + '@') and not worker.node:
                        worker.node = node
                        print('  %s answered a ping.' % node)


def _find_owner(app: Celery, app_module: ModuleType, job_id: str,
                workers: list[Worker], timeout: float = 60) -> tuple[Worker, float]:
    """Find the worker that runs the job, and when it started, from the workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.inspect(timeout=1.0).query_task(job_id) or {}
        for node, jobs in replies.items():
            state, info = jobs.get(job_id, (None, None))
            if state == 'active':
                worker = next(w for w in workers if w.node == node)
                return worker, float(info.get('time_start') or time.time())
        time.sleep(0.5)
    raise SystemExit('No worker started job %s in %.0f s.' % (job_id, timeout))


def _kill_main_process(worker: Worker) -> float:
    """Kill a worker's main process with SIGKILL, as the OOM killer would."""
    os.kill(worker.process.pid, signal.SIGKILL)
    killed_at = time.time()
    worker.process.wait()
    print("Killed %s's main process (pid %d) with SIGKILL."
          % (worker.node, worker.process.pid))
    return killed_at


def _wait_for_result(job: Any, timeout: float) -> Any:
    """Wait for the job's result, or for its error if it failed."""
    try:
        return job.get(timeout=timeout, interval=0.5, propagate=False)
    except Exception as exc:  # The demo reports every way of not getting it.
        return exc


def _print_timeline(app_module: ModuleType, app: Celery, job_id: str,
                    killed_at: float | None, owner: Worker) -> None:
    """Print what happened to the job, in words."""
    print('\nTimeline of job %s:' % job_id)


def _compare(value: Any, expected: dict[str, Any]) -> int:
    """Print the job's result beside the independent audit, and judge it."""
    print('\nResult from the workers: %s' % _describe(value))
    print('Audit computed here:     %s' % _describe(expected))
    if value == expected:
        print('The result equals the independent audit.')
        return 0
    print('The result DIFFERS from the independent audit:')
    print('  from the workers: %s' % json.dumps(value, sort_keys=True, default=repr))
    print('  computed here:    %s' % json.dumps(expected, sort_keys=True))
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
