"""Settings of the example project, read from the environment.

The demo, its workers and a person at a shell all build the same app from these:

- ``EXAMPLE_BROKER_URL``: the broker, ``filesystem://`` by default, which keeps its
  queues in files under the var folder and needs no server. ``redis://...`` and
  ``amqp://...`` work as well.
- ``EXAMPLE_RESULT_BACKEND``: where results go; the Redis broker itself when the
  broker is Redis, a ``file://`` folder under the var folder otherwise.
- ``EXAMPLE_STORE_URL``: turnout's store; the Redis broker itself when the broker is
  Redis, a ``file://`` folder under the var folder otherwise.
- ``EXAMPLE_VAR_DIR``: the var folder, ``var/`` at the top of the repository.
- ``EXAMPLE_SUPERVISE_INTERVAL``: seconds between supervise messages, 2 by default.
- ``EXAMPLE_CHUNK_DELAY``: seconds the job sleeps after each chunk of rows, so that it
  runs long enough to be worth supervising; 1.4 by default, about 70 seconds a job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from celery import Celery


def var_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Return the folder for the ledger and the local broker, results and store.

    Args:
        environ: The environment to read ``EXAMPLE_VAR_DIR`` from.

    Returns:
        An absolute path; nothing is created.
    """
    default = Path(__file__).resolve().parent.parent / 'var'
    return Path(environ.get('EXAMPLE_VAR_DIR', default)).resolve()


def chunk_delay(environ: Mapping[str, str] = os.environ) -> float:
    """Return the seconds the job sleeps after each chunk.

    Args:
        environ: The environment to read ``EXAMPLE_CHUNK_DELAY`` from.

    Returns:
        The delay in seconds.
    """
    return float(environ.get('EXAMPLE_CHUNK_DELAY', '1.4'))


def configure(app: Celery, environ: Mapping[str, str] = os.environ) -> None:
    """Configure the app from the environment, as the module docstring describes.

    The folders that the local broker, results and store need are created here: the
    workers and the demo all configure the app before they touch any of them.

    Args:
        app: The app to configure.
        environ: The environment to read.
    """
    local = var_dir(environ) / 'local'
    broker = environ.get('EXAMPLE_BROKER_URL', 'filesystem://')
    shared = broker if broker.startswith(('redis://', 'rediss://')) else None
    interval = float(environ.get('EXAMPLE_SUPERVISE_INTERVAL', '2'))
    folders = [local / 'results', local / 'store'] if not shared else []

    app.conf.update(
        broker_url=broker,
        result_backend=environ.get(
            'EXAMPLE_RESULT_BACKEND', shared or (local / 'results').as_uri()
        ),
        turnout_store_url=environ.get(
            'EXAMPLE_STORE_URL', shared or (local / 'store').as_uri()
        ),
        turnout_supervise_interval=interval,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
    )

    if broker.startswith('filesystem://'):
        folders += [local / 'queues', local / 'exchanges']
        app.conf.broker_transport_options = {
            'data_folder_in': str(local / 'queues'),
            'data_folder_out': str(local / 'queues'),
            'control_folder': str(local / 'exchanges'),
            # The default of one second would make each supervise round trip slow.
            'polling_interval': 0.1,
        }
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
