"""The claim store: who started which attempt of a job, and what it needs to resume.

Brokers have no compare-and-set, so two carriers of the same job (a redelivered
initiating message and a re-dispatched copy, or two takeovers) can both arrive.
The store settles it. Whoever starts attempt ``a`` of a job first claims
``(job, a)`` with the id of the copy it holds:

- the claim is free: this copy starts attempt ``a``;
- it holds this very copy id: an earlier holder of the same delivery died
  before handing it over, so the copy moves on to attempt ``a + 1``;
- it holds another copy id: this copy is a duplicate and is dropped;
- it holds a completion mark: the job already finished.

A finishing job claims its next attempt with a completion mark, so nothing can
start it again and a late result of a superseded copy can be recognised and
dropped. The store also keeps each job's initiating message (for a takeover),
a cancel mark, a short history, and what the job reported about itself: its
latest progress and its checkpoint (the state a later attempt resumes from).
Both are written only by an attempt that is still current, in the same atomic
step that checks it.

Two implementations share these semantics: :class:`RedisStore`, atomic through
one Lua script, and :class:`FileStore`, a directory for the embedded broker,
atomic through a per-job file lock.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from celery import Celery

from .errors import ImproperlyConfigured

#: Prefix of a claim that marks a job finished.
DONE = 'done:'
#: Most fence notices kept for one worker: the newest, which name every job a
#: takeover of its latest ticks took.
KEPT_FENCE_LIMIT = 1000


class Verdict(enum.Enum):
    """What the store decided about one copy of a job."""

    START = 'start'
    DUPLICATE = 'duplicate'
    FINISHED = 'finished'
    CANCELLED = 'cancelled'
    EXHAUSTED = 'exhausted'


@dataclass(frozen=True)
class Admission:
    """The store's answer to :meth:`Store.admit`.

    Attributes:
        verdict: Whether to start the copy, and why not otherwise.
        attempt: The attempt the copy starts as (or would have started as).
        holder: Who holds the claim that decided it, or the cancel reason.
    """

    verdict: Verdict
    attempt: int
    holder: str


class Store(ABC):
    """Atomic claims and durable records for jobs, shared by all workers."""

    def __init__(self, prefix: str, ttl: float) -> None:
        self.prefix = prefix
        self.ttl = max(1, int(ttl))

    @abstractmethod
    def admit(
        self, job: str, attempt: int, copy: str, message: bytes,
        last_attempt: int, event: Mapping[str, Any],
    ) -> Admission:
        """Decide whether ``copy`` of ``job`` starts, and as which attempt.

        On :attr:`Verdict.START` the job's message is stored and ``event``
        (with the attempt filled in) is added to its history, in the same
        atomic step. An attempt beyond ``last_attempt`` is
        :attr:`Verdict.EXHAUSTED` and claims nothing.
        """

    @abstractmethod
    def finish(
        self, job: str, attempt: int, worker: str,
        event: Mapping[str, Any] | None = None,
    ) -> bool:
        """Mark ``job`` finished by ``attempt``; False if superseded or cancelled.

        ``event`` is added to the job's history in the same step when the mark
        is written.
        """

    @abstractmethod
    def superseded(self, job: str, attempt: int) -> bool:
        """True if a later attempt claimed ``job``, or it finished or was cancelled."""

    @abstractmethod
    def cancel(self, job: str, reason: str) -> None:
        """Mark ``job`` cancelled; no copy of it starts from now on."""

    @abstractmethod
    def cancelled(self, job: str) -> str | None:
        """The cancel reason of ``job``, or None."""

    @abstractmethod
    def message(self, job: str) -> bytes | None:
        """The stored initiating message of ``job``, or None."""

    @abstractmethod
    def log(self, job: str, *events: Mapping[str, Any]) -> None:
        """Append events to the history of ``job``."""

    def log_many(self, entries: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """Append one event to the history of each of several jobs."""
        for job, event in entries:
            self.log(job, event)

    @abstractmethod
    def history(self, job: str) -> list[dict[str, Any]]:
        """The events of ``job``, oldest first."""

    # What a running job reports about itself. Each write names the attempt
    # that makes it and is refused, atomically, once that attempt is
    # superseded (a later attempt claimed the job, it finished or it was
    # cancelled), so a zombie copy can never overwrite a newer attempt's.

    def save_progress(
        self, job: str, attempt: int, progress: Mapping[str, Any],
    ) -> bool:
        """Record the latest progress of ``job``, reported by ``attempt``.

        Returns:
            False, and nothing written, when ``attempt`` was superseded.
        """
        return self._save(job, attempt, [('progress', dict(progress))])

    def save_checkpoint(
        self, job: str, attempt: int, state: Any,
        progress: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record the resume state of ``job`` (and its progress, if given).

        ``state`` must be JSON-serialisable; the record keeps it with the
        attempt that saved it and the time.

        Returns:
            False, and nothing written, when ``attempt`` was superseded.
        """
        records = [('checkpoint', _checkpoint_record(attempt, state))]
        if progress is not None:
            records.append(('progress', dict(progress)))
        return self._save(job, attempt, records)

    @abstractmethod
    def _save(
        self, job: str, attempt: int, records: list[tuple[str, dict[str, Any]]],
    ) -> bool:
        """Write named records of ``job`` at once, unless ``attempt`` is superseded."""

    @abstractmethod
    def progress(self, job: str) -> dict[str, Any] | None:
        """The latest progress record of ``job``, or None."""

    def progress_of(self, jobs: Sequence[str]) -> list[dict[str, Any] | None]:
        """The latest progress record of each of ``jobs``, in their order."""
        return [self.progress(job) for job in jobs]

    @abstractmethod
    def checkpoint(self, job: str) -> dict[str, Any] | None:
        """The last checkpoint of ``job``: ``state``, ``attempt`` and ``at``."""

    # The monitor board holds monitor messages until they come due, for brokers
    # that return a dead consumer's unacknowledged messages only much later
    # (Redis) or never (the filesystem transport). A claimed check is leased:
    # if its checker dies, it comes due again when the lease ends.

    @abstractmethod
    def post_check(self, due: float, body: str) -> None:
        """Put a monitor message on the board, due at ``due`` (epoch seconds)."""

    @abstractmethod
    def claim_checks(
        self, now: float, lease: float, limit: int,
    ) -> tuple[list[tuple[str, str]], float | None]:
        """Lease the checks due by ``now`` to the caller for ``lease`` seconds.

        Returns:
            The claimed checks as ``(token, body)`` pairs, and the time the
            next check on the board comes due (None when the board is empty).
        """

    @abstractmethod
    def complete_check(self, token: str) -> None:
        """Remove a claimed check from the board."""

    # A fence notice reaches its owner through the owner's control queue,
    # which the broker deletes once the owner has left it unused for
    # turnout_queue_expires. The store keeps a copy, for an owner that was
    # silent that long (a long pause, a long partition).

    @abstractmethod
    def keep_fence(self, owner: str, body: str) -> None:
        """Keep a copy of a fence notice sent to the worker ``owner``."""

    @abstractmethod
    def kept_fences(self, owner: str) -> list[str]:
        """The fence notices kept for the worker ``owner``, oldest first."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot be used right now."""

    def close(self) -> None:  # noqa: B027  (optional for implementations)
        """Release connections or files."""


_ADMIT = """
local cancel = redis.call('GET', KEYS[1])
if cancel then return {'cancelled', ARGV[2], cancel} end
local a = tonumber(ARGV[2])
while true do
  local key = ARGV[1] .. a
  local holder = redis.call('GET', key)
  if not holder then
    if a > tonumber(ARGV[6]) then return {'exhausted', tostring(a), ''} end
    redis.call('SET', key, ARGV[3], 'EX', ARGV[5])
    redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
    local event = cjson.decode(ARGV[7])
    event['attempt'] = a
    redis.call('RPUSH', KEYS[3], cjson.encode(event))
    redis.call('EXPIRE', KEYS[3], ARGV[5])
    return {'start', tostring(a), ARGV[3]}
  end
  if holder ~= ARGV[3] then
    if string.sub(holder, 1, 5) == 'done:' then
      return {'finished', tostring(a), holder}
    end
    return {'duplicate', tostring(a), holder}
  end
  a = a + 1
end
"""


# A write by an attempt that is still current: neither its next attempt's
# claim (a takeover or the completion mark) nor the cancel mark exists.
_SAVE_CURRENT = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[1])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[1]) end
return 1
"""

# Completion is refused to a cancelled job; claiming it twice is harmless.
_FINISH = """
local holder = redis.call('GET', KEYS[1])
if holder then return holder == ARGV[1] and 1 or 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
"""


_CLAIM_CHECKS = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, item in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], item)
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {due, head[2] or false}
"""


class RedisStore(Store):
    """Claims in Redis; every key of one job shares a hash slot."""

    def __init__(self, url: str, prefix: str, ttl: float) -> None:
        super().__init__(prefix, ttl)
        import redis

        self._client = redis.Redis.from_url(url)
        self._admit = self._client.register_script(_ADMIT)
        self._claim_checks = self._client.register_script(_CLAIM_CHECKS)
        self._save_current = self._client.register_script(_SAVE_CURRENT)
        self._finish = self._client.register_script(_FINISH)
        self._board = f'{prefix}:monitor-board'

    def _key(self, job: str, name: str) -> str:
        return f'{self.prefix}:{{{job}}}:{name}'

    def admit(
        self, job: str, attempt: int, copy: str, message: bytes,
        last_attempt: int, event: Mapping[str, Any],
    ) -> Admission:
        verdict, started, holder = self._admit(
            keys=[self._key(job, 'cancel'), self._key(job, 'message'),
                  self._key(job, 'history')],
            args=[self._key(job, 'claim:'), attempt, copy, message, self.ttl,
                  last_attempt, json.dumps(dict(event))],
        )
        return Admission(Verdict(_text(verdict)), int(started), _text(holder))

    def finish(
        self, job: str, attempt: int, worker: str,
        event: Mapping[str, Any] | None = None,
    ) -> bool:
        keys = [self._key(job, f'claim:{attempt + 1}'), self._key(job, 'cancel'),
                self._key(job, 'history')]
        mark = f'{DONE}{worker}:{attempt}'
        logged = json.dumps(dict(event)) if event is not None else ''
        return bool(self._finish(keys=keys, args=[mark, self.ttl, logged]))

    def superseded(self, job: str, attempt: int) -> bool:
        keys = (self._key(job, f'claim:{attempt + 1}'), self._key(job, 'cancel'))
        return bool(self._client.exists(*keys))

    def cancel(self, job: str, reason: str) -> None:
        self._client.set(self._key(job, 'cancel'), reason or 'cancelled', ex=self.ttl)

    def cancelled(self, job: str) -> str | None:
        reason = self._client.get(self._key(job, 'cancel'))
        return None if reason is None else _text(reason)

    def message(self, job: str) -> bytes | None:
        data = self._client.get(self._key(job, 'message'))
        if isinstance(data, str):
            return data.encode()
        return data

    def log(self, job: str, *events: Mapping[str, Any]) -> None:
        key = self._key(job, 'history')
        pipe = self._client.pipeline(transaction=False)
        pipe.rpush(key, *(json.dumps(dict(event)) for event in events))
        pipe.expire(key, self.ttl)
        pipe.execute()

    def log_many(self, entries: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for job, event in entries:
            key = self._key(job, 'history')
            pipe.rpush(key, json.dumps(dict(event)))
            pipe.expire(key, self.ttl)
        pipe.execute()

    def history(self, job: str) -> list[dict[str, Any]]:
        rows = self._client.lrange(self._key(job, 'history'), 0, -1)
        return [json.loads(row) for row in rows]

    def _save(
        self, job: str, attempt: int, records: list[tuple[str, dict[str, Any]]],
    ) -> bool:
        keys = [self._key(job, f'claim:{attempt + 1}'), self._key(job, 'cancel')]
        keys += [self._key(job, name) for name, _ in records]
        args: list[str | int] = [self.ttl]
        args += [json.dumps(record) for _, record in records]
        return bool(self._save_current(keys=keys, args=args))

    def progress(self, job: str) -> dict[str, Any] | None:
        return _loads(self._client.get(self._key(job, 'progress')))

    def progress_of(self, jobs: Sequence[str]) -> list[dict[str, Any] | None]:
        # One round trip for any number of jobs; a pipeline rather than MGET,
        # since each job's keys live in a hash slot of their own.
        pipe = self._client.pipeline(transaction=False)
        for job in jobs:
            pipe.get(self._key(job, 'progress'))
        return [_loads(row) for row in pipe.execute()]

    def checkpoint(self, job: str) -> dict[str, Any] | None:
        return _loads(self._client.get(self._key(job, 'checkpoint')))

    def keep_fence(self, owner: str, body: str) -> None:
        key = self._fences_key(owner)
        with self._client.pipeline() as pipe:
            pipe.rpush(key, body)
            pipe.ltrim(key, -KEPT_FENCE_LIMIT, -1)
            pipe.expire(key, self.ttl)
            pipe.execute()

    def kept_fences(self, owner: str) -> list[str]:
        return [_raw_text(item)
                for item in self._client.lrange(self._fences_key(owner), 0, -1)]

    def _fences_key(self, owner: str) -> str:
        return f'{self.prefix}:fences:{owner}'

    def ping(self) -> None:
        self._client.ping()

    def post_check(self, due: float, body: str) -> None:
        self._client.zadd(self._board, {body: due})

    def claim_checks(
        self, now: float, lease: float, limit: int,
    ) -> tuple[list[tuple[str, str]], float | None]:
        due, head = self._claim_checks(
            keys=[self._board], args=[now, now + lease, limit],
        )
        # surrogateescape keeps a foreign member's bytes intact, so that the
        # token still removes it, while its body fails to parse as a check.
        checks = [(_raw_text(item), _raw_text(item)) for item in due]
        return checks, None if head is None else float(head)

    def complete_check(self, token: str) -> None:
        self._client.zrem(self._board, token.encode('utf-8', 'surrogateescape'))

    def close(self) -> None:
        self._client.close()


class FileStore(Store):
    """Claims as files in a directory shared by the workers of one machine.

    Each job has a folder; a ``flock`` on its lock file makes every decision
    atomic across processes. Expiry is not enforced: the folder of a finished
    job stays until someone removes it.
    """

    _SAFE = re.compile(r'^[A-Za-z0-9_.-]{1,100}$')

    def __init__(self, root: str, prefix: str, ttl: float) -> None:
        super().__init__(prefix, ttl)
        self.root = os.path.join(root, prefix)
        os.makedirs(self.root, exist_ok=True)

    def _folder(self, job: str) -> str:
        name = job if self._SAFE.match(job) and job not in ('.', '..') else (
            'sha1-' + hashlib.sha1(job.encode()).hexdigest()
        )
        return os.path.join(self.root, name)

    def _locked(self, job: str) -> _JobLock:
        return _JobLock(self._folder(job))

    def admit(
        self, job: str, attempt: int, copy: str, message: bytes,
        last_attempt: int, event: Mapping[str, Any],
    ) -> Admission:
        with self._locked(job) as folder:
            reason = _read(os.path.join(folder, 'cancel'))
            if reason is not None:
                return Admission(Verdict.CANCELLED, attempt, reason)
            a = attempt
            while True:
                holder = _read(os.path.join(folder, f'claim.{a}'))
                if holder is None:
                    if a > last_attempt:
                        return Admission(Verdict.EXHAUSTED, a, '')
                    _write(os.path.join(folder, f'claim.{a}'), copy)
                    _write(os.path.join(folder, 'message'), message)
                    self._append(folder, [dict(event, attempt=a)])
                    return Admission(Verdict.START, a, copy)
                if holder != copy:
                    finished = holder.startswith(DONE)
                    verdict = Verdict.FINISHED if finished else Verdict.DUPLICATE
                    return Admission(verdict, a, holder)
                a += 1

    def finish(
        self, job: str, attempt: int, worker: str,
        event: Mapping[str, Any] | None = None,
    ) -> bool:
        mark = f'{DONE}{worker}:{attempt}'
        with self._locked(job) as folder:
            path = os.path.join(folder, f'claim.{attempt + 1}')
            holder = _read(path)
            if holder is not None:
                return holder == mark
            if os.path.exists(os.path.join(folder, 'cancel')):
                return False
            _write(path, mark)
            if event is not None:
                self._append(folder, [event])
            return True

    def superseded(self, job: str, attempt: int) -> bool:
        folder = self._folder(job)
        return any(
            os.path.exists(os.path.join(folder, name))
            for name in (f'claim.{attempt + 1}', 'cancel')
        )

    def cancel(self, job: str, reason: str) -> None:
        with self._locked(job) as folder:
            _write(os.path.join(folder, 'cancel'), reason or 'cancelled')

    def cancelled(self, job: str) -> str | None:
        return _read(os.path.join(self._folder(job), 'cancel'))

    def message(self, job: str) -> bytes | None:
        try:
            with open(os.path.join(self._folder(job), 'message'), 'rb') as file:
                return file.read()
        except FileNotFoundError:
            return None

    def log(self, job: str, *events: Mapping[str, Any]) -> None:
        with self._locked(job) as folder:
            self._append(folder, events)

    def history(self, job: str) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self._folder(job), 'history')) as file:
                return [json.loads(line) for line in file if line.strip()]
        except FileNotFoundError:
            return []

    def _save(
        self, job: str, attempt: int, records: list[tuple[str, dict[str, Any]]],
    ) -> bool:
        encoded = [(name, json.dumps(record)) for name, record in records]
        with self._locked(job) as folder:
            if any(
                os.path.exists(os.path.join(folder, name))
                for name in (f'claim.{attempt + 1}', 'cancel')
            ):
                return False
            for name, data in encoded:
                _write(os.path.join(folder, name), data)
            return True

    def progress(self, job: str) -> dict[str, Any] | None:
        return _loads(_read(os.path.join(self._folder(job), 'progress')))

    def checkpoint(self, job: str) -> dict[str, Any] | None:
        return _loads(_read(os.path.join(self._folder(job), 'checkpoint')))

    def keep_fence(self, owner: str, body: str) -> None:
        with _JobLock(self._fences_folder(owner)) as folder:
            with open(os.path.join(folder, 'fences'), 'a') as file:
                file.write(json.dumps(body) + '\n')

    def kept_fences(self, owner: str) -> list[str]:
        path = os.path.join(self._fences_folder(owner), 'fences')
        try:
            with open(path) as file:
                lines = file.read().splitlines()
        except FileNotFoundError:
            return []
        kept = []
        for line in lines[-KEPT_FENCE_LIMIT:]:
            try:
                kept.append(json.loads(line))
            except ValueError:
                continue  # torn by a crash in the middle of an append
        return [body for body in kept if isinstance(body, str)]

    def _fences_folder(self, owner: str) -> str:
        digest = hashlib.sha1(owner.encode()).hexdigest()
        return os.path.join(self.root, '.fences', digest)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f'cannot write to {self.root}')

    def post_check(self, due: float, body: str) -> None:
        os.makedirs(self._board, exist_ok=True)
        _write(os.path.join(self._board, _board_name(due)), body)

    def claim_checks(
        self, now: float, lease: float, limit: int,
    ) -> tuple[list[tuple[str, str]], float | None]:
        try:
            names = sorted(os.listdir(self._board))
        except FileNotFoundError:
            return [], None
        checks: list[tuple[str, str]] = []
        upcoming: float | None = None
        for name in names:
            due = _board_due(name)
            if due is None:
                continue
            if due > now or len(checks) >= limit:
                upcoming = due if upcoming is None else min(upcoming, due)
                continue
            leased = _board_name(now + lease)
            try:
                # Only one claimant's rename of the same file succeeds.
                os.rename(os.path.join(self._board, name),
                          os.path.join(self._board, leased))
            except FileNotFoundError:
                continue
            body = _read(os.path.join(self._board, leased))
            if body is not None:
                checks.append((leased, body))
            upcoming = now + lease if upcoming is None else min(upcoming, now + lease)
        return checks, upcoming

    def complete_check(self, token: str) -> None:
        try:
            os.remove(os.path.join(self._board, token))
        except FileNotFoundError:
            pass

    @property
    def _board(self) -> str:
        return os.path.join(self.root, '.monitor-board')

    @staticmethod
    def _append(folder: str, events: Any) -> None:
        lines = ''.join(json.dumps(dict(event)) + '\n' for event in events)
        with open(os.path.join(folder, 'history'), 'a') as file:
            file.write(lines)


class _JobLock:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._fd = -1

    def __enter__(self) -> str:
        os.makedirs(self.folder, exist_ok=True)
        self._fd = os.open(os.path.join(self.folder, '.lock'), os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self.folder

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _read(path: str) -> str | None:
    try:
        with open(path, errors='surrogateescape') as file:
            return file.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: str | bytes) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
    with os.fdopen(fd, 'wb') as file:
        file.write(raw)
    os.replace(tmp, path)


def _board_name(due: float) -> str:
    # Rounded down, so that a check is never claimed later than it was due.
    micros = math.floor(due * 1_000_000)
    return f'{micros // 1_000_000:013d}.{micros % 1_000_000:06d}_{os.urandom(8).hex()}'


def _board_due(name: str) -> float | None:
    try:
        return float(name.partition('_')[0])
    except ValueError:
        return None


def _checkpoint_record(attempt: int, state: Any) -> dict[str, Any]:
    return {'attempt': attempt, 'at': time.time(), 'state': state}


def _loads(data: bytes | str | None) -> dict[str, Any] | None:
    if data is None:
        return None
    record = json.loads(data)
    return record if isinstance(record, dict) else None


def _raw_text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', 'surrogateescape')
    return str(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_store(url: str, prefix: str, ttl: float) -> Store:
    """Open the store at ``url`` (``redis://``, ``rediss://`` or ``file://``).

    Raises:
        ImproperlyConfigured: the URL names no store this package has.
    """
    scheme = urlparse(url).scheme
    if scheme in ('redis', 'rediss', 'unix'):
        return RedisStore(url, prefix, ttl)
    if scheme == 'file':
        path = unquote(urlparse(url).path)
        if not path:
            raise ImproperlyConfigured(f'turnout_store_url {url!r} names no directory.')
        return FileStore(path, prefix, ttl)
    raise ImproperlyConfigured(
        f'turnout_store_url {url!r} is neither a redis:// URL nor a file:// directory.'
    )


_stores: weakref.WeakKeyDictionary[Celery, tuple[int, Store]] = (
    weakref.WeakKeyDictionary()
)
_stores_lock = threading.Lock()


def store_for(app: Celery) -> Store:
    """The store of ``app`` in this process, opened on first use.

    A forked pool child opens its own: connections do not survive a fork.
    """
    from .settings import Settings

    pid = os.getpid()
    with _stores_lock:
        cached = _stores.get(app)
        if cached is not None and cached[0] == pid:
            return cached[1]
        settings = Settings.from_app(app)
        store = open_store(
            settings.store_url, settings.queue_prefix, settings.record_ttl,
        )
        _stores[app] = (pid, store)
        return store

