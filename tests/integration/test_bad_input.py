"""Malformed and foreign input reaches turnout, and turnout drops it and serves on.

Turnout reads four places that anyone with access to the broker (or the store) can
write to: a worker's control queue, its two supervise lanes, the shared monitor
queue (RabbitMQ) and the monitor board in the store (Redis, filesystem). The tests
put garbage there (bytes in no accepted format, JSON of the wrong shape, checks
naming workers or jobs that do not exist, a job list of 50,000 entries) and check
that each is logged and dropped, that the workers keep serving and that no real job
is lost or taken over. They also check the caller's side (arguments that do not
serialise, a task name no worker knows) and that turnout's own messages travel with
the app's serializer: pickle, and Celery's message signing.

Worker processes that need another serializer import their app from this module
(``-A test_bad_input:variant_app``): it is the test app of ``app.py`` with the
settings that ``TURNOUT_IT_VARIANT`` names applied.

Known problem outside turnout: kombu's filesystem transport lets a reader take a
message file that its writer has created but not yet filled; a worker that reads
such a file from its task queue dies with ``Unrecoverable error: JSONDecodeError``.
Any test that sends a job while workers poll can hit it, rarely.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import app as app_module
import pytest
from celery import Celery
from harness import Cluster, Worker, wait_for, worker_environment
from kombu import Exchange, Queue
from kombu.exceptions import EncodeError

import celery_turnout
from celery_turnout.settings import Settings
from celery_turnout.store import store_for

pytestmark = pytest.mark.integration

#: Selects the app variant of a worker: ``pickle`` or ``signed``.
VARIANT = "TURNOUT_IT_VARIANT"
#: Where the signing key, certificate and certificate store are (signed only).
SECURITY_DIR = "TURNOUT_IT_SECURITY_DIR"

#: Entries in an oversized job list of a fence notice or a monitor message.
OVERSIZED = 50_000
#: Entries in the job list of a check that leads to a takeover: fewer, since each
#: costs store round trips and a log line (a smaller list shows the same stall).
OVERSIZED_TAKEOVER = 10_000

#: How long a worker may take to log that it is ready.
READY_TIMEOUT = 60.0

#: What a worker logs when its supervision thread fails on something.
FAILED = "failed; restarting it"

STARTED = re.compile(
    r"Turnout supervision started for worker (\S+): supervise lanes (\S+) and (\S+),"
)

_variant_app: Celery | None = None


def configure_variant(app: Celery, env: Mapping[str, str], worker: bool) -> Celery:
    """Apply the serializer settings that ``env[VARIANT]`` names to ``app``.

    Args:
        app: The test app, not yet used.
        env: The ``TURNOUT_IT_*`` variables.
        worker: True in a worker process. The test process registers the signing
            serializer without ``setup_security()``, which would disable every
            other serializer for the rest of the test session.
    """
    variant = env.get(VARIANT)
    if variant == "pickle":
        app.conf.update(
            task_serializer="pickle",
            accept_content=["pickle"],
            result_serializer="pickle",
            result_accept_content=["pickle"],
        )
    elif variant == "signed":
        folder = Path(env[SECURITY_DIR])
        app.conf.update(
            security_key=str(folder / "worker.key"),
            security_certificate=str(folder / "certs" / "worker.pem"),
            security_cert_store=str(folder / "certs" / "*.pem"),
            task_serializer="auth",
            event_serializer="auth",
            accept_content=["auth"],
            result_accept_content=["json"],
        )
        if worker:
            app.setup_security()
        else:
            from celery.security.serialization import register_auth

            register_auth(
                key=(folder / "worker.key").read_text(),
                cert=(folder / "certs" / "worker.pem").read_text(),
                store=str(folder / "certs" / "*.pem"),
            )
    elif variant:
        raise ValueError(f"unknown {VARIANT} {variant!r}")
    return app


def __getattr__(name: str) -> Any:
    """Build ``variant_app`` on first use, in the worker that asks for it.

    It is the app that ``app.py`` built from the environment, configured before
    its first use, so that no task is registered twice.
    """
    global _variant_app
    if name != "variant_app":
        raise AttributeError(name)
    if _variant_app is None:
        _variant_app = configure_variant(app_module.app, os.environ, True)
    return _variant_app


# -- workers ---------------------------------------------------------------------


def spawn(cluster: Cluster, app: str = "app", concurrency: int = 1) -> Worker:
    """Start one ``celery worker`` of ``cluster`` on the app ``app`` names.

    Readiness is read from the worker's log rather than from a ping, so that it
    works whatever serializer the worker accepts.
    """
    index = len(cluster.workers) + 1
    base = f"w{index}-{cluster.token}"
    log_path = cluster.directory / f"worker-{index}.log"
    command = [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "-P", "prefork", "-c", str(concurrency),
        "-n", f"{base}@%h", "--loglevel=INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cluster.directory,
            env=worker_environment(cluster.env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(
        name=f"{base}@{socket.gethostname()}", process=process, log_path=log_path
    )
    cluster.workers.append(worker)
    return worker


def start(cluster: Cluster, count: int, app: str = "app") -> list[Worker]:
    """Start ``count`` workers and wait until each logs that it is ready."""
    workers = [spawn(cluster, app) for _ in range(count)]
    for worker in workers:

        def ready(worker: Worker = worker) -> bool:
            if worker.process.poll() is not None:
                raise AssertionError(f"{worker.name} exited:\n{worker.log()}")
            text = worker.log()
            return STARTED.search(text) is not None and " ready." in text

        wait_for(ready, READY_TIMEOUT, f"{worker.name} to be ready")
    return workers


def names_of(worker: Worker) -> tuple[str, str, str]:
    """Return (worker id, lane 0, lane 1) from the worker's log."""
    found = STARTED.search(worker.log())
    assert found, f"{worker.name} logged no supervision start"
    return found.group(1), found.group(2), found.group(3)


def prefix(cluster: Cluster) -> str:
    """The turnout queue prefix of the cluster."""
    return cluster.env["TURNOUT_IT_QUEUE_PREFIX"]


def history_events(cluster: Cluster, job_id: str) -> list[str]:
    """The event names in a job's turnout history."""
    return [e["event"] for e in celery_turnout.history(cluster.app, job_id)]


def wait_until_covered(cluster: Cluster, job_id: str) -> None:
    """Wait until a tick covers the job."""
    wait_for(
        lambda: "covered" in history_events(cluster, job_id),
        10,
        f"job {job_id} to be covered",
    )


def count_in_logs(cluster: Cluster, text: str) -> int:
    """How many times ``text`` appears in all worker logs together."""
    return sum(log.count(text) for _, log in cluster.logs())


# -- writing garbage ---------------------------------------------------------------


def publish(
    cluster: Cluster,
    queue: str,
    body: bytes,
    content_type: str = "application/json",
    declare: bool = False,
) -> None:
    """Put one raw message straight into ``queue`` through the default exchange."""
    with cluster.app.connection_for_write() as connection:
        if declare:
            Queue(
                queue,
                Exchange(""),
                routing_key=queue,
                durable=True,
                queue_arguments={"x-expires": 120_000},
            )(connection.default_channel).declare()
        producer = connection.Producer()
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            content_type=content_type,
            content_encoding="binary",
            delivery_mode=2,
            retry=True,
        )


def message_count(cluster: Cluster, queue: str) -> int:
    """Ready messages in ``queue``; 0 when it does not exist."""
    with cluster.app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            _, count, _ = channel.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # closed by the broker after a failed declare
                pass
        return int(count)


def jdump(body: Any) -> bytes:
    """JSON bytes of ``body``."""
    return json.dumps(body).encode()


def monitor_body(
    owner: str, lane: str, control: str, jobs: list[list[Any]], tick: int = 0
) -> dict[str, Any]:
    """A monitor message that is due now."""
    return {
        "kind": "monitor",
        "owner": owner,
        "lane": lane,
        "control": control,
        "tick": tick,
        "due": time.time(),
        "jobs": jobs,
    }


def fence_body(owner: str, jobs: list[list[Any]]) -> bytes:
    """A well-formed fence notice for ``owner`` naming ``jobs``."""
    return jdump({
        "kind": "fence", "owner": owner, "by": "nobody", "reason": "garbage",
        "jobs": jobs,
    })  # fmt: skip


def post_check(cluster: Cluster, body: bytes) -> None:
    """Put a check on the monitor board (Redis, filesystem) or queue (RabbitMQ)."""
    if cluster.broker_name == "rabbitmq":
        publish(cluster, f"{prefix(cluster)}.monitor", body)
    else:
        store_for(cluster.app).post_check(time.time(), body)  # type: ignore[arg-type]


def board_bodies(cluster: Cluster) -> list[bytes]:
    """The checks on the store's monitor board (Redis, filesystem), as bytes."""
    if cluster.broker_name == "redis":
        import redis

        client = redis.Redis.from_url(cluster.env["TURNOUT_IT_STORE_URL"])
        try:
            return list(client.zrange(f"{prefix(cluster)}:monitor-board", 0, -1))
        finally:
            client.close()
    store_root = cluster.env["TURNOUT_IT_STORE_URL"][len("file://") :]
    board = Path(store_root) / prefix(cluster) / ".monitor-board"
    bodies = []
    for path in board.iterdir():
        try:
            bodies.append(path.read_bytes())
        except FileNotFoundError:  # claimed and renamed meanwhile
            pass
    return bodies


def off_the_board(cluster: Cluster, *bodies: bytes) -> bool:
    """True when none of ``bodies`` is on the monitor board any more."""
    present = board_bodies(cluster)
    return not any(body in present for body in bodies)


def ghost_lane(cluster: Cluster) -> tuple[str, str, str]:
    """Return (owner, lane, control) of a worker that never existed, its lane full.

    A check of that lane finds a supervise message in it and so takes the
    "owner" for dead: the path of a takeover, for jobs that do not exist.
    """
    owner = f"ghost-{uuid.uuid4().hex[:8]}@nowhere.00000000"
    lane = f"{prefix(cluster)}.supervise.{owner}.0"
    control = f"{prefix(cluster)}.control.{owner}"
    body = {"kind": "supervise", "owner": owner, "tick": 0}
    publish(cluster, lane, jdump(body), declare=cluster.broker_name == "rabbitmq")
    return owner, lane, control


def forget_ghost(cluster: Cluster, *queues: str) -> None:
    """Delete the ghost's queues that a Redis broker would keep for ever."""
    if cluster.broker_name != "redis":
        return
    import redis

    client = redis.Redis.from_url(cluster.env["TURNOUT_IT_BROKER_URL"])
    try:
        client.delete(*queues)
    finally:
        client.close()


# -- the tests ---------------------------------------------------------------------


def test_garbage_on_the_control_queue_and_the_monitor_is_logged_and_dropped(
    cluster: Cluster,
) -> None:
    """Garbage on the control queue and among the checks is logged and dropped."""
    owner, peer = start(cluster, 2)
    job = cluster.send("it.sleeper", 6.0)
    first = cluster.wait_started(job.id)
    holder = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)
    worker_id, _, _ = names_of(holder)
    control = f"{prefix(cluster)}.control.{worker_id}"

    # The control queue of the worker that holds the job.
    wrong_shapes = [
        jdump([1, 2, 3]),
        jdump({"kind": "monitor"}),
        jdump({"kind": "fence", "owner": worker_id, "by": "x", "reason": "x",
               "jobs": [["a-job", "not an attempt"]]}),
    ]  # fmt: skip
    publish(cluster, control, b"\x00\xff\xfe garbage", "application/octet-stream")
    publish(cluster, control, b"{not json")
    for body in wrong_shapes:
        publish(cluster, control, body)
    # Well formed, but naming jobs this worker does not hold: nothing to obey.
    unknown_jobs = [[f"no-such-job-{i}", 1] for i in range(3)]
    publish(cluster, control, fence_body(worker_id, unknown_jobs))

    # The checks: RabbitMQ's monitor queue, the store's board elsewhere.
    owner_id, lane, ghost_control = ghost_lane(cluster)
    lost_job = f"not-in-the-store-{uuid.uuid4().hex[:8]}"
    if cluster.broker_name == "rabbitmq":
        publish(cluster, f"{prefix(cluster)}.monitor", b"\x00\xff", "application/x-foo")
    nobody = f"{prefix(cluster)}.supervise.nobody@nowhere.12345678"
    checks = [
        b"{not json",
        jdump({"kind": "monitor", "owner": 7}),
        # A worker that never existed (and so has an empty lane).
        jdump(monitor_body(
            "nobody@nowhere.12345678", f"{nobody}.0",
            f"{prefix(cluster)}.control.nobody", unknown_jobs,
        )),
        # A dead-looking worker holding a job whose message is not in the store.
        jdump(monitor_body(owner_id, lane, ghost_control, [[lost_job, 1]])),
    ]  # fmt: skip
    for check in checks:
        post_check(cluster, check)

    # A job message for a task that no worker knows, with turnout's headers.
    stranger = cluster.app.send_task(
        "it.no_such_task", args=(1,),
        headers={"turnout_attempt": 1, "turnout_copy": uuid.uuid4().hex},
    )  # fmt: skip

    malformed_control = "Dropping a malformed message from control queue"
    wait_for(
        lambda: count_in_logs(cluster, malformed_control) >= 5,
        10,
        "the five malformed control messages to be dropped",
    )
    wait_for(
        lambda: count_in_logs(cluster, f"Cannot re-dispatch job {lost_job}"),
        10,
        "the check naming a job with no stored message to be dropped",
    )
    if cluster.broker_name == "rabbitmq":
        malformed_checks = "Dropping a malformed message from monitor queue"
        wait_for(
            lambda: (
                count_in_logs(cluster, "cannot be decoded") >= 2
                and count_in_logs(cluster, malformed_checks) >= 1
            ),
            10,
            "the undecodable and malformed monitor messages to be dropped",
        )
        monitor = f"{prefix(cluster)}.monitor"
        wait_for(
            lambda: message_count(cluster, monitor) == 0,
            10,
            "every check to be taken from the monitor queue",
        )
    else:
        malformed_checks = "Dropping a malformed monitor check"
        wait_for(
            lambda: count_in_logs(cluster, malformed_checks) >= 2,
            10,
            "the malformed checks to be dropped",
        )
        wait_for(
            lambda: off_the_board(cluster, *checks), 10, "the checks to leave the board"
        )
    wait_for(
        lambda: count_in_logs(cluster, "it.no_such_task"),
        10,
        "the job of an unknown task to be dropped",
    )
    wait_for(
        lambda: message_count(cluster, control) == 0, 10, "the control queue to drain"
    )

    # The workers serve on, and no real job was taken over or lost.
    outcome: dict[str, Any] = job.get(timeout=30)
    assert outcome["attempt"] == 1
    assert "taken_over" not in history_events(cluster, job.id)
    after = cluster.send("it.sleeper", 0.5)
    assert after.get(timeout=30)["attempt"] == 1
    assert all(w.process.poll() is None for w in (owner, peer))
    assert count_in_logs(cluster, FAILED) == 0, "a supervision thread failed"
    assert celery_turnout.history(cluster.app, stranger.id) == []
    assert celery_turnout.history(cluster.app, lost_job) == []
    forget_ghost(cluster, lane, ghost_control)


@pytest.mark.transports("rabbitmq")
def test_checks_due_far_ahead_hold_up_no_takeover(cluster: Cluster) -> None:
    """Checks due a day ahead cannot fill the slots the real checks need."""
    start(cluster, 2)
    job = cluster.send("it.sleeper", 8.0)
    first = cluster.wait_started(job.id)
    holder = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)
    owner_id, lane, ghost_control = ghost_lane(cluster)
    far = monitor_body(owner_id, lane, ghost_control, [["no-such-job", 1]])
    prefetch = Settings.from_app(cluster.app).monitor_prefetch
    for tick in range(2 * prefetch + 50):
        far.update(tick=tick, due=time.time() + 86_400)
        publish(cluster, f"{prefix(cluster)}.monitor", jdump(far))
    wait_for(
        lambda: count_in_logs(cluster, "too far ahead") >= 2 * prefetch + 50,
        30,
        "every far-ahead check to be dropped",
    )

    holder.kill()

    second = cluster.wait_started(job.id, attempt=2, timeout=DETECTION + 10)
    assert second["worker"] != holder.name
    forget_ghost(cluster, lane, ghost_control)


@pytest.mark.transports("filesystem", "redis")
def test_a_check_of_bytes_that_are_not_text_is_dropped_from_the_board(
    cluster: Cluster,
) -> None:
    """A non-UTF-8 check on the board is dropped and takeovers go on."""
    start(cluster, 2)
    job = cluster.send("it.sleeper", 5.0)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)

    garbage = b"\xff\xfe\x00 not utf-8"
    post_check(cluster, garbage)
    wait_for(
        lambda: (
            count_in_logs(cluster, "Dropping a malformed monitor check")
            or count_in_logs(cluster, FAILED)
        ),
        10,
        "the check to be dropped, or a supervision thread to fail on it",
    )
    # A dead owner's job must still be taken over by the peer.
    owner.kill()
    second = wait_for(
        lambda: cluster.records.started(job.id, 2),
        DETECTION + 5,
        f"attempt 2 of job {job.id} to start after its owner died",
    )
    assert second["worker"] != owner.name
    assert job.get(timeout=30)["attempt"] == 2
    assert count_in_logs(cluster, FAILED) == 0, "a supervision thread failed"
    assert off_the_board(cluster, garbage)


@pytest.mark.transports("redis")
def test_foreign_messages_in_a_supervise_lane_take_no_job_over(
    cluster: Cluster,
) -> None:
    """Foreign messages in a live worker's lanes do not get its job taken over."""
    start(cluster, 2)
    job = cluster.send("it.sleeper", 4.0)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)
    _, lane_0, lane_1 = names_of(owner)

    # Garbage into both lanes, several times across a few ticks.
    for _ in range(4):
        for lane in (lane_0, lane_1):
            publish(cluster, lane, b"\x00\xff garbage", "application/octet-stream")
            publish(cluster, lane, jdump({"kind": "supervise", "tick": "x"}))
        time.sleep(cluster.interval / 2)

    outcome: dict[str, Any] = job.get(timeout=30)
    events = history_events(cluster, job.id)
    assert "taken_over" not in events, events
    assert outcome["attempt"] == 1
    assert all(w.process.poll() is None for w in cluster.workers)


@pytest.mark.transports("redis")
def test_oversized_job_lists_are_dropped_without_taking_any_job_over(
    cluster: Cluster, figure: Any
) -> None:
    """Job lists of thousands of unknown jobs stall no tick into a takeover."""
    workers = start(cluster, 2)
    # One job each (one pool process, prefetch one), so that whichever worker
    # takes the large check holds a job that stalled ticks would expose.
    jobs = [cluster.send("it.sleeper", 6.0) for _ in workers]
    holders = {cluster.wait_started(job.id)["worker"] for job in jobs}
    assert holders == {w.name for w in workers}
    for job in jobs:
        wait_until_covered(cluster, job.id)

    worker_id, _, _ = names_of(workers[0])
    many = [[f"no-such-job-{i}", 1] for i in range(OVERSIZED)]
    publish(cluster, f"{prefix(cluster)}.control.{worker_id}",
            fence_body(worker_id, many))  # fmt: skip
    nobody = f"{prefix(cluster)}.supervise.nobody@nowhere.12345678"
    post_check(cluster, jdump(monitor_body(
        "nobody@nowhere.12345678", f"{nobody}.0",
        f"{prefix(cluster)}.control.nobody", many,
    )))  # fmt: skip
    owner_id, lane, control = ghost_lane(cluster)
    refs = [[f"unknown-{i}", 1] for i in range(OVERSIZED_TAKEOVER)]
    posted = time.monotonic()
    post_check(cluster, jdump(monitor_body(owner_id, lane, control, refs)))
    last = f"Cannot re-dispatch job unknown-{OVERSIZED_TAKEOVER - 1} attempt 1"
    wait_for(
        lambda: count_in_logs(cluster, last), 60, "the last unknown job to be dropped"
    )
    figure(
        f"{cluster.broker_name}: a takeover of {OVERSIZED_TAKEOVER} unknown jobs "
        f"took {time.monotonic() - posted:.1f} s"
    )

    outcomes = [job.get(timeout=60) for job in jobs]
    after = cluster.send("it.sleeper", 0.5)
    assert after.get(timeout=30)["attempt"] == 1
    forget_ghost(cluster, lane, control)
    assert count_in_logs(cluster, FAILED) == 0, "a supervision thread failed"
    for job in jobs:
        assert "taken_over" not in history_events(cluster, job.id)
    assert [outcome["attempt"] for outcome in outcomes] == [1, 1]


def test_a_job_whose_arguments_do_not_serialise_fails_in_the_caller_and_leaves_nothing(
    cluster: Cluster,
) -> None:
    """Arguments that JSON cannot carry fail in the caller; nothing is sent or kept."""
    app = cluster.app
    queue = cluster.env["TURNOUT_IT_TASK_QUEUE"]
    with app.connection_for_write() as connection:
        app.amqp.queues[queue](connection.default_channel).declare()
    job_id = f"unserialisable-{uuid.uuid4().hex}"

    with pytest.raises(EncodeError, match="not JSON serializable"):
        app.tasks["it.sleeper"].apply_async(args=(object(),), task_id=job_id)

    assert message_count(cluster, queue) == 0
    assert celery_turnout.history(app, job_id) == []
    assert store_for(app).message(job_id) is None
    assert app.AsyncResult(job_id).state == "PENDING"
    # The caller's connection still works for the next job.
    app.tasks["it.sleeper"].apply_async(args=(0.1,))
    assert wait_for(lambda: message_count(cluster, queue) == 1, 5, "the next job")
    with app.connection_for_write() as connection:
        app.amqp.queues[queue](connection.default_channel).purge()


def send_edited_job(cluster: Cluster, edit: Callable[[Any], Any]) -> str:
    """Send an ``it.sleeper`` job whose task message ``edit`` changed; its id."""
    app = cluster.app
    message = edit(app.amqp.as_task_v2(uuid.uuid4().hex, "it.sleeper", args=(0.1,)))
    with app.producer_or_acquire() as producer:
        app.amqp.send_task_message(producer, "it.sleeper", message)
    return str(message.headers["id"])


@pytest.mark.parametrize(
    "eta",
    [
        "not-a-date",  # Celery cannot build a request of it
        "0001-01-01T00:00:00+14:00",  # Celery cannot make a timestamp of it
    ],
)
def test_a_job_celery_refuses_after_admission_fails_and_is_held_no_longer(
    cluster: Cluster, eta: str
) -> None:
    """A message Celery cannot run ends FAILURE, not as a phantom job."""
    (worker,) = start(cluster, 1)
    app = cluster.app

    def with_eta(message: Any) -> Any:
        message.headers["eta"] = eta
        return message

    job_id = send_edited_job(cluster, with_eta)

    wait_for(
        lambda: app.AsyncResult(job_id).state == "FAILURE",
        30,
        f"Celery to refuse job {job_id}",
    )

    def held_no_longer() -> bool:
        # Each inspect call takes seconds on a loaded machine (the filesystem
        # transport polls), so the wait allows several. That transport can
        # also hand a reader a reply file not yet written, and the command
        # fails to decode it: such a call counts as no answer.
        try:
            replies = cluster.inspect("turnout-jobs")
        except AssertionError as exc:
            if "Expecting value" not in str(exc):
                raise
            return False
        return worker.name in replies and job_id not in str(replies[worker.name])

    wait_for(held_no_longer, 30, f"{worker.name} to let go of job {job_id}")
    assert cluster.send("it.sleeper", 0.1).get(timeout=30)["attempt"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"not": "a list"},
        [[0.1], {}],
        ["0.1", {}, {}],
        [[0.1], [], {}],
        [[0.1], {}, "embed"],
        [[0.1], {}, {"callbacks": "it.sleeper"}],
        [[0.1], {}, {"chord": {"args": []}}],
        [[0.1], {}, {"callbacks": [{"task": "it.sleeper", "args": 5}]}],
    ],
    ids=[
        "mapping",
        "two-items",
        "args-string",
        "kwargs-list",
        "embed-string",
        "callbacks-string",
        "chord-without-task",
        "callback-args-number",
    ],
)
def test_a_job_message_of_the_wrong_shape_fails_and_the_worker_goes_on(
    cluster: Cluster, body: Any
) -> None:
    (worker,) = start(cluster, 1)
    app = cluster.app
    job_id = send_edited_job(cluster, lambda message: message._replace(body=body))

    wait_for(
        lambda: app.AsyncResult(job_id).state == "FAILURE",
        30,
        f"job {job_id} to fail",
    )
    assert f"job {job_id} (it.sleeper): its " in str(app.AsyncResult(job_id).result)
    assert [e["event"] for e in celery_turnout.history(app, job_id)] == ["refused"]
    assert cluster.send("it.sleeper", 0.1).get(timeout=30)["attempt"] == 1
    assert worker.process.poll() is None, worker.log()


@pytest.mark.transports("redis")
@pytest.mark.parametrize(
    "store_url",
    ["file:///proc/turnout-cannot-create-this", "redis://127.0.0.1:1/0"],
    ids=["folder-not-creatable", "redis-unreachable"],
)
def test_a_worker_whose_store_is_unusable_exits_at_start_saying_why(
    cluster: Cluster, store_url: str
) -> None:
    cluster.env["TURNOUT_IT_STORE_URL"] = store_url
    worker = spawn(cluster)

    wait_for(lambda: worker.process.poll() is not None, 60, f"{worker.name} to exit")

    log = worker.log()
    assert worker.process.returncode != 0
    assert "celery-turnout cannot reach its store" in log, log
    assert "Connection to broker lost" not in log, log


# -- the app's serializer ------------------------------------------------------------

#: The promised delay from an owner's death to the next attempt, with slack.
DETECTION = 1.5 + 3.0


def peek_lane_content_type(cluster: Cluster, lanes: tuple[str, str]) -> str:
    """Return the content type of a supervise message, left in its lane."""
    accept = list(cluster.app.conf.accept_content)

    def peek() -> str | None:
        with cluster.app.connection_for_write() as connection:
            for lane in lanes:
                q = Queue(lane, Exchange(""), routing_key=lane, no_declare=True)
                try:
                    message = q(connection.default_channel).get(
                        no_ack=False, accept=accept
                    )
                except connection.channel_errors:
                    continue
                if message is not None:
                    message.requeue()
                    return str(message.content_type)
        return None

    return wait_for(peek, 10, "a supervise message in a lane")


def takeover_with_variant(cluster: Cluster, content_type: str) -> None:
    """Run a job on variant workers, kill its owner, see the next attempt finish."""
    configure_variant(cluster.app, cluster.env, worker=False)
    start(cluster, 2, app="test_bad_input:variant_app")
    job = cluster.send("it.sleeper", 4.0)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    wait_until_covered(cluster, job.id)
    _, lane_0, lane_1 = names_of(owner)
    assert peek_lane_content_type(cluster, (lane_0, lane_1)) == content_type
    # The covering tick has acknowledged the job's message by now, so the job
    # comes back through a takeover, not through a redelivery.
    time.sleep(cluster.interval)

    owner.kill()
    second = cluster.wait_started(job.id, attempt=2, timeout=DETECTION + 10)
    assert second["worker"] != owner.name
    outcome: dict[str, Any] = job.get(timeout=30)
    assert outcome["attempt"] == 2
    assert "taken_over" in history_events(cluster, job.id)
    for text in ("malformed", "cannot be decoded", FAILED):
        assert count_in_logs(cluster, text) == 0, text


@pytest.mark.transports("rabbitmq")
def test_turnout_messages_use_the_apps_pickle_serializer_and_a_takeover_works(
    cluster: Cluster,
) -> None:
    """With pickle as the only accepted content, supervision and takeover work."""
    cluster.env[VARIANT] = "pickle"
    # Celery refuses to run a pickle-accepting worker as root without it.
    cluster.env["C_FORCE_ROOT"] = "1"
    takeover_with_variant(cluster, "application/x-python-serialize")


@pytest.mark.transports("rabbitmq")
def test_a_job_runs_and_is_taken_over_with_signed_messages(
    cluster: Cluster, tmp_path: Path
) -> None:
    """With Celery's message signing, turnout signs its messages; takeover works."""
    pytest.importorskip("cryptography", reason="message signing needs cryptography")
    folder = tmp_path / "security"
    (folder / "certs").mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=turnout-it", "-keyout", str(folder / "worker.key"),
         "-out", str(folder / "certs" / "worker.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    cluster.env[VARIANT] = "signed"
    cluster.env[SECURITY_DIR] = str(folder)
    takeover_with_variant(cluster, "application/data")
