"""A check reads a lane where it lies, so a checker's death loses nothing.

Were a check to take the supervise message and put it back, a checker killed
in between would leave the message in Redis's unacknowledged set until the
visibility timeout, or delete it for good on the filesystem transport; the next
checker would find a dead owner's lane empty and let its jobs go. (RabbitMQ
returns a dead checker's message at once: there the check takes and returns it.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cluster

from celery_turnout import supervision
from celery_turnout.messages import supervise_body
from celery_turnout.settings import Settings
from celery_turnout.store import store_for
from celery_turnout.supervision import Supervisor, _Session

pytestmark = [pytest.mark.integration, pytest.mark.transports("filesystem", "redis")]


class CheckerDied(BaseException):
    """Stands for a SIGKILL: nothing after it runs, nothing is cleaned up."""


@pytest.fixture
def session(cluster: Cluster) -> Iterator[_Session]:
    app = cluster.app
    supervisor = Supervisor(app, "peek-test", Settings.from_app(app), store_for(app))
    with app.connection_for_write() as connection:
        session = _Session(connection, supervisor)
        session.declare(monitor=False)
        yield session


def lane_size(session: _Session, lane: str) -> int:
    """Messages in ``lane`` that any consumer could still take."""
    channel = session.channel
    if session.connection.transport.driver_type == "redis":
        return int(channel.client.llen(lane))
    return len(list(Path(channel.data_folder_in).glob(f"*.{lane}.msg")))


def held_unacknowledged(session: _Session, lane: str) -> list[str]:
    """Delivery tags kombu holds as unacknowledged for messages of ``lane``."""
    channel = session.channel
    if session.connection.transport.driver_type != "redis":
        return []  # the filesystem transport deletes a message when it is taken
    entries = channel.client.hgetall(channel.unacked_key)
    return [
        tag.decode() for tag, entry in entries.items() if json.loads(entry)[2] == lane
    ]


def put_oldest(session: _Session, lane: str, raw: bytes) -> None:
    """Put ``raw`` into ``lane`` ahead of everything already there."""
    channel = session.channel
    if session.connection.transport.driver_type == "redis":
        channel.client.rpush(lane, raw)  # kombu takes from the right
    else:
        name = f"0000_{uuid.uuid4()}.{lane}.msg"  # the oldest name sorts first
        (Path(channel.data_folder_in) / name).write_bytes(raw)


def test_a_checker_dying_in_the_middle_of_a_check_leaves_the_lane_as_it_was(
    session: _Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = session.lanes[0].name
    session.publish(supervise_body("owner", 7), lane)

    def die(message: object) -> None:
        raise CheckerDied

    # The checker dies once it has the supervise message in hand.
    with monkeypatch.context() as patch:
        patch.setattr(supervision, "_supervise_tick", die)
        with pytest.raises(CheckerDied):
            session.peek_tick(lane, ["json"])

    assert lane_size(session, lane) == 1
    assert held_unacknowledged(session, lane) == []
    assert session.peek_tick(lane, ["json"]) == 7


def test_a_check_drops_foreign_messages_ahead_of_the_supervise_message(
    session: _Session,
) -> None:
    lane = session.lanes[1].name
    session.publish(supervise_body("owner", 3), lane)
    put_oldest(session, lane, json.dumps({"body": "e30=", "properties": {}}).encode())
    put_oldest(session, lane, b"not a kombu message")

    assert session.peek_tick(lane, ["json"]) == 3
    assert lane_size(session, lane) == 1
