"""The ``turnout_*`` settings, read from ``app.conf``.

Every setting has a default that works for a cluster whose jobs run for
minutes or hours. The names below are the keys of ``app.conf``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from celery import Celery

from .errors import ImproperlyConfigured

#: Documented defaults, keyed by setting name.
DEFAULTS: Mapping[str, Any] = {
    #: Seconds between two supervise ticks of a worker that holds jobs. A dead
    #: worker is detected within ``interval + grace``. At least
    #: :data:`MIN_SUPERVISE_INTERVAL`.
    'turnout_supervise_interval': 5.0,
    #: Seconds a monitor check waits past one interval before it looks at the
    #: owner's supervise lane. ``None`` means half the interval; it must stay
    #: below one interval.
    'turnout_grace': None,
    #: How many times a job may be taken over after a lost worker before it
    #: ends ``FAILURE`` with :class:`~celery_turnout.errors.JobExhausted`.
    'turnout_max_takeovers': 3,
    #: Where start and completion claims, stored messages and job history
    #: live: a ``redis://`` URL or a ``file://`` directory shared by all
    #: workers. ``None`` derives it from the result backend or the broker.
    'turnout_store_url': None,
    #: Prefix of every queue and store key turnout creates.
    'turnout_queue_prefix': 'turnout',
    #: Seconds an unused per-worker queue lives before the broker drops it
    #: (``x-expires``). ``None`` means 20 intervals, at least 60 seconds.
    'turnout_queue_expires': None,
    #: Seconds the shared monitor queue lives with no consumer at all.
    'turnout_monitor_queue_expires': 7 * 24 * 3600.0,
    #: Seconds claims, stored messages and history are kept in the store: longer
    #: than any job waits and runs, and at least :data:`MIN_RECORD_TTL_BOUNDS`
    #: detection bounds.
    'turnout_record_ttl': 7 * 24 * 3600.0,
    #: What a warm shutdown does with held jobs: ``'handoff'`` stops them and
    #: re-dispatches them at once; ``'wait'`` lets them finish first. A cold
    #: shutdown hands them off in either mode, once Celery's
    #: ``worker_soft_shutdown_timeout`` is over.
    'turnout_shutdown': 'handoff',
    #: How many monitor messages one worker may hold while they come due.
    'turnout_monitor_prefetch': 100,
}

_SHUTDOWN_MODES = ('handoff', 'wait')

#: The shortest supervise interval, in seconds. Each tick publishes a
#: supervise message, posts a monitor check and purges the previous message:
#: several broker round trips that must be done well inside one interval, or
#: a tick that is merely slow looks like a dead worker and its jobs are taken
#: over. A round trip takes about a millisecond on loopback, tens of them over
#: a network, and a busy worker's tick can start a good part of a second late;
#: at 0.1 s the grace is already only 50 ms.
MIN_SUPERVISE_INTERVAL = 0.1

#: ``turnout_record_ttl`` must be at least this many detection bounds. A job's
#: stored message is written when a worker admits an attempt and is not
#: renewed; a takeover reads it to re-dispatch the job. Even for a job whose
#: worker dies right after admitting it, that read comes up to about four
#: detection bounds later (an interval until the first tick covers it, a
#: detection bound until the check is due, and two more if that check is
#: retried after its lease); loaded machines have seen checks several
#: intervals later still. A record that expires first loses the job.
MIN_RECORD_TTL_BOUNDS = 10


@dataclass(frozen=True)
class Settings:
    """Validated turnout settings of one app."""

    supervise_interval: float
    grace: float
    max_takeovers: int
    store_url: str
    queue_prefix: str
    queue_expires: float
    monitor_queue_expires: float
    record_ttl: float
    shutdown: str
    monitor_prefetch: int

    @property
    def detection_bound(self) -> float:
        """Seconds within which a dead owner's jobs are re-dispatched."""
        return self.supervise_interval + self.grace

    @classmethod
    def from_app(cls, app: Celery) -> Settings:
        """Read and check the settings of ``app``.

        Raises:
            ImproperlyConfigured: a value is missing, of the wrong type or out
                of range; the message names the setting and what it needs.
        """
        conf = {key: app.conf.get(key, default) for key, default in DEFAULTS.items()}
        interval = _positive(conf, 'turnout_supervise_interval')
        if interval < MIN_SUPERVISE_INTERVAL:
            raise ImproperlyConfigured(
                f'turnout_supervise_interval is {interval:g} s; use at least '
                f'{MIN_SUPERVISE_INTERVAL:g} s. Each tick makes several broker '
                'round trips that must finish well inside one interval, or a slow '
                'tick looks like a dead worker and its jobs are taken over.'
            )
        grace = conf['turnout_grace']
        grace = interval / 2 if grace is None else _positive(conf, 'turnout_grace')
        if grace >= interval:
            raise ImproperlyConfigured(
                f'turnout_grace ({grace:g} s) must be shorter than '
                f'turnout_supervise_interval ({interval:g} s): a check due after '
                'the next tick could read the next supervise message as unread.'
            )
        expires = conf['turnout_queue_expires']
        expires = (
            max(60.0, 20 * interval) if expires is None
            else _positive(conf, 'turnout_queue_expires')
        )
        if expires < 4 * (interval + grace):
            raise ImproperlyConfigured(
                f'turnout_queue_expires ({expires:g} s) must be at least four '
                'detection bounds, or a supervise lane could vanish under a check.'
            )
        shutdown = conf['turnout_shutdown']
        if shutdown not in _SHUTDOWN_MODES:
            raise ImproperlyConfigured(
                f'turnout_shutdown is {shutdown!r}; use one of {_SHUTDOWN_MODES}.'
            )
        max_takeovers = conf['turnout_max_takeovers']
        if (
            isinstance(max_takeovers, bool) or not isinstance(max_takeovers, int)
            or max_takeovers < 0
        ):
            raise ImproperlyConfigured(
                f'turnout_max_takeovers is {max_takeovers!r}; use an integer >= 0.'
            )
        prefix = conf['turnout_queue_prefix']
        if not isinstance(prefix, str) or not prefix or ':' in prefix:
            raise ImproperlyConfigured(
                f'turnout_queue_prefix is {prefix!r}; use a non-empty name '
                'without colons.'
            )
        record_ttl = _positive(conf, 'turnout_record_ttl')
        if record_ttl < MIN_RECORD_TTL_BOUNDS * (interval + grace):
            raise ImproperlyConfigured(
                f'turnout_record_ttl ({record_ttl:g} s) must be at least '
                f'{MIN_RECORD_TTL_BOUNDS} detection bounds (interval + grace), '
                f'{MIN_RECORD_TTL_BOUNDS * (interval + grace):g} s, and longer '
                'than the longest job runs: a takeover re-dispatches a job from '
                'its stored message, and a job whose record expired first is lost.'
            )
        return cls(
            supervise_interval=interval,
            grace=grace,
            max_takeovers=max_takeovers,
            store_url=conf['turnout_store_url'] or derive_store_url(app),
            queue_prefix=prefix,
            queue_expires=expires,
            monitor_queue_expires=_positive(conf, 'turnout_monitor_queue_expires'),
            record_ttl=record_ttl,
            shutdown=shutdown,
            monitor_prefetch=_monitor_prefetch(conf['turnout_monitor_prefetch']),
        )


def derive_store_url(app: Celery) -> str:
    """Pick the claim store when ``turnout_store_url`` is not set.

    A Redis result backend comes first, then a Redis broker, then a folder next
    to the filesystem transport's data.

    Raises:
        ImproperlyConfigured: no store can be derived (RabbitMQ with a result
            backend other than Redis).
    """
    for url in (app.conf.result_backend, app.conf.broker_url):
        if isinstance(url, str) and urlparse(url).scheme in ('redis', 'rediss'):
            return url
    broker = app.conf.broker_url or ''
    if isinstance(broker, str) and broker.startswith('filesystem:'):
        options = app.conf.broker_transport_options or {}
        folder = options.get('data_folder_in')
        if folder:
            parent = os.path.dirname(os.path.abspath(folder.rstrip('/')))
            return 'file://' + os.path.join(parent, 'turnout-store')
    raise ImproperlyConfigured(
        'celery-turnout needs a store that every worker shares for its start '
        'claims; none can be derived from this broker and result backend. Set '
        'turnout_store_url to a redis:// URL or a file:// directory.'
    )


def _positive(conf: Mapping[str, Any], key: str) -> float:
    value = conf[key]
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value <= 0
    ):
        raise ImproperlyConfigured(f'{key} is {value!r}; use a positive number.')
    return float(value)


def _monitor_prefetch(value: Any) -> int:
    # AMQP carries a prefetch count in 16 bits, and 0 would mean no limit.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ImproperlyConfigured(
            f'turnout_monitor_prefetch is {value!r}; use an integer from 1 to 65535 '
            '(AMQP carries it in 16 bits).'
        )
    return value
