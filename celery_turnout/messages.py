"""The bodies of turnout's own messages, and the stored form of a job's message.

Three kinds travel between workers:

- a *supervise* message, which an owner drops into one of its two lanes on
  every tick and purges one tick later;
- a *monitor* message, which names the owner's jobs and the lane to check, and
  which a peer holds until it comes due;
- a *fence* notice, which tells an owner that it lost some of its jobs.

Every body is a flat dict of strings and numbers, so any serializer the app
accepts can carry it. Parsing checks the shape and raises
:class:`~celery_turnout.errors.MalformedMessage` with the reason.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu.message import Message

from .errors import MalformedMessage

#: Header carrying a job's attempt number; 1 when absent.
ATTEMPT_HEADER = 'turnout_attempt'
#: Header carrying the id of one published copy of a job's message.
COPY_HEADER = 'turnout_copy'

#: The most jobs one monitor message or fence notice may name; one worker holds
#: far fewer, so a longer list is malformed (and would stall whoever reads it).
MAX_JOBS = 20_000

#: A job as a monitor message or fence notice names it: (job id, attempt).
JobRef = tuple[str, int]


@dataclass(frozen=True)
class Monitor:
    """A monitor message: "check ``lane`` at ``due``; if unread, take over"."""

    owner: str
    lane: str
    control: str
    tick: int
    due: float
    jobs: tuple[JobRef, ...]

    def to_body(self) -> dict[str, Any]:
        """The message body."""
        return {
            'kind': 'monitor', 'owner': self.owner, 'lane': self.lane,
            'control': self.control, 'tick': self.tick, 'due': self.due,
            'jobs': [list(job) for job in self.jobs],
        }

    @classmethod
    def from_body(cls, body: Any) -> Monitor:
        """Parse a received body.

        Raises:
            MalformedMessage: the body is not a monitor message.
        """
        fields = _fields(body, 'monitor')
        return cls(
            owner=_text(fields, 'owner'),
            lane=_text(fields, 'lane'),
            control=_text(fields, 'control'),
            tick=_integer(fields, 'tick'),
            due=_number(fields, 'due'),
            jobs=_job_refs(fields),
        )


@dataclass(frozen=True)
class Fence:
    """A fence notice: ``owner`` lost ``jobs`` to ``by``."""

    owner: str
    by: str
    reason: str
    jobs: tuple[JobRef, ...]

    def to_body(self) -> dict[str, Any]:
        """The message body."""
        return {
            'kind': 'fence', 'owner': self.owner, 'by': self.by,
            'reason': self.reason, 'jobs': [list(job) for job in self.jobs],
        }

    @classmethod
    def from_body(cls, body: Any) -> Fence:
        """Parse a received body.

        Raises:
            MalformedMessage: the body is not a fence notice.
        """
        fields = _fields(body, 'fence')
        return cls(
            owner=_text(fields, 'owner'),
            by=_text(fields, 'by'),
            reason=_text(fields, 'reason'),
            jobs=_job_refs(fields),
        )


def supervise_body(owner: str, tick: int) -> dict[str, Any]:
    """The body of a supervise message; only its presence in a lane matters."""
    return {'kind': 'supervise', 'owner': owner, 'tick': tick}


@dataclass(frozen=True)
class StoredMessage:
    """A job's initiating message, kept so that a peer can re-dispatch it.

    The body stays in its serialized form: a re-dispatched copy carries the
    same bytes (and so the same signature, when the app signs messages).
    """

    task: str
    exchange: str
    routing_key: str
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    body: bytes
    content_type: str
    content_encoding: str

    @classmethod
    def from_message(cls, message: Message) -> StoredMessage:
        """Capture a received kombu message."""
        info = message.delivery_info or {}
        body = message.body
        if isinstance(body, str):
            body = body.encode(message.content_encoding or 'utf-8')
        props = message.properties or {}
        return cls(
            task=str(message.headers.get('task', '')),
            exchange=info.get('exchange') or '',
            routing_key=info.get('routing_key') or '',
            headers=dict(message.headers),
            properties={
                key: props[key]
                for key in ('correlation_id', 'reply_to', 'priority', 'delivery_mode')
                if props.get(key) is not None
            },
            body=body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )

    def dumps(self) -> bytes:
        """Encode for the store (JSON; the body as base64)."""
        return json.dumps({
            'task': self.task, 'exchange': self.exchange,
            'routing_key': self.routing_key, 'headers': self.headers,
            'properties': self.properties,
            'body': base64.b64encode(self.body).decode('ascii'),
            'content_type': self.content_type,
            'content_encoding': self.content_encoding,
        }, default=str).encode()

    @classmethod
    def loads(cls, data: bytes) -> StoredMessage:
        """Decode what :meth:`dumps` wrote.

        Raises:
            MalformedMessage: the stored record is damaged.
        """
        try:
            fields = json.loads(data)
            return cls(
                task=fields['task'], exchange=fields['exchange'],
                routing_key=fields['routing_key'], headers=fields['headers'],
                properties=fields['properties'],
                body=base64.b64decode(fields['body']),
                content_type=fields['content_type'],
                content_encoding=fields['content_encoding'],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedMessage(f'stored job message is damaged: {exc!r}') from exc


def _fields(body: Any, kind: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise MalformedMessage(f'expected a {kind} body (a mapping), got {body!r:.80}')
    if body.get('kind') != kind:
        raise MalformedMessage(f'expected kind {kind!r}, got {body.get("kind")!r:.40}')
    return body


def _text(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedMessage(f'field {key!r} must be a non-empty string')
    return value


def _integer(fields: Mapping[str, Any], key: str) -> int:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedMessage(f'field {key!r} must be an integer')
    return value


def _number(fields: Mapping[str, Any], key: str) -> float:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedMessage(f'field {key!r} must be a number')
    # JSON decoders accept NaN and Infinity; a NaN due time would never come
    # due and would hold up every check queued behind it.
    if not math.isfinite(value):
        raise MalformedMessage(f'field {key!r} must be a finite number')
    return float(value)


def _job_refs(fields: Mapping[str, Any]) -> tuple[JobRef, ...]:
    jobs = fields.get('jobs')
    if not isinstance(jobs, list):
        raise MalformedMessage("field 'jobs' must be a list")
    if len(jobs) > MAX_JOBS:
        raise MalformedMessage(f'names {len(jobs)} jobs, more than {MAX_JOBS}')
    refs = []
    for job in jobs:
        if (
            not isinstance(job, (list, tuple)) or len(job) != 2
            or not isinstance(job[0], str) or not job[0]
            or isinstance(job[1], bool) or not isinstance(job[1], int) or job[1] < 1
        ):
            raise MalformedMessage(f'job entry {job!r:.60} is not [job id, attempt]')
        refs.append((job[0], job[1]))
    return tuple(refs)


def copy_id(headers: Mapping[str, Any], job_id: str, attempt: int) -> str:
    """The copy id of a received job message.

    A message published without turnout's header (by ``send_task`` from an
    app that does not know the task, say) gets an id derived from the job and
    attempt, so that a redelivery of it is still recognised as the same copy.
    """
    copy = headers.get(COPY_HEADER)
    return copy if isinstance(copy, str) and copy else f'{job_id}:{attempt}:unmarked'


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt a job message carries, 1 when absent.

    Raises:
        MalformedMessage: the header is not a positive integer.
    """
    attempt = headers.get(ATTEMPT_HEADER, 1)
    if attempt is None:
        return 1
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise MalformedMessage(f'header {ATTEMPT_HEADER!r} is {attempt!r:.40}')
    return attempt
