"""Turnout declares only queues that RabbitMQ 4.3 still accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from harness import Cluster, rabbitmqctl, wait_for

import celery_turnout

pytestmark = pytest.mark.integration


def declared_queues(prefix: str) -> list[dict[str, Any]]:
    """Return RabbitMQ's view of every queue whose name holds ``prefix``."""
    output = rabbitmqctl(
        "-q", "--formatter", "json",
        "list_queues", "name", "durable", "auto_delete", "exclusive", "arguments",
    )  # fmt: skip
    return [q for q in json.loads(output) if prefix in q["name"]]


def argument_names(queue: dict[str, Any]) -> set[str]:
    """Return the names of a queue's declaration arguments."""
    arguments = queue["arguments"]
    if isinstance(arguments, dict):
        return set(arguments)
    return {argument[0] for argument in arguments}


@pytest.mark.transports("rabbitmq")
def test_every_turnout_queue_is_durable_with_an_expiry_or_exclusive(
    cluster: Cluster,
) -> None:
    cluster.start(2)
    job = cluster.send("it.sleeper", 3.0)
    cluster.wait_started(job.id)
    wait_for(
        lambda: any(
            e["event"] == "covered" for e in celery_turnout.history(cluster.app, job.id)
        ),
        timeout=10,
        what=f"job {job.id} to be covered by supervision",
    )

    queues = declared_queues(cluster.env["TURNOUT_IT_QUEUE_PREFIX"])

    assert len(queues) >= len(cluster.workers) + 1, queues
    for queue in queues:
        shared_and_durable = queue["durable"] and "x-expires" in argument_names(queue)
        assert shared_and_durable or queue["exclusive"], queue
