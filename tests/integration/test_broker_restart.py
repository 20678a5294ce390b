"""A broker restart in the middle of a long job causes no takeover and loses nothing.

Each test runs its workers on a private broker that it starts itself on a free
loopback port (a ``redis-server`` without persistence, or a RabbitMQ node of its
own), so that restarting it disturbs no other test. The result backend and
turnout's claim store stay on the shared Redis, which is never restarted: only the
broker goes away. While it is down the supervision threads cannot tick or check;
when it is back they must resume by themselves and must not mistake the gap for
the death of a worker.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, Worker, wait_for

import celery_turnout

pytestmark = pytest.mark.integration

#: How long the job runs, and when (seconds after its start) the broker stops.
#: The job must outlast the outage, the broker's boot and Celery's reconnection
#: back-off (2, 4, 6, 8 s), or it ends before supervision can prove its owner.
JOB_SECONDS = 45.0
STOP_AFTER = 8.0

#: How long the broker stays away, from its stop to the moment it answers again.
OUTAGE = 10.0

#: How long a private broker may take to start (a RabbitMQ node boots slowly on
#: a loaded two-core machine).
BROKER_START_TIMEOUT = 60.0

#: Seconds after the broker is back within which supervision must tick again:
#: the supervision thread retries every second, the worker's task consumer
#: backs off for longer, and the ``turnout-jobs`` reply has to travel too.
RESUME_WITHIN = 30.0

def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_answers(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def missing(tool: str) -> None:
    """Skip (fail under CI) a test whose broker program is not installed."""
    message = f"{tool} is not installed"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class PrivateRedis:
    """A ``redis-server`` of one test on a free loopback port, without persistence."""

    def __init__(self, directory: Path) -> None:
        """Prepare the server; nothing runs before :meth:`start`."""
        if shutil.which("redis-server") is None:
            missing("redis-server")
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: How long the last start took, in seconds.
        self.boot_seconds = 0.0

    @property
    def url(self) -> str:
        """The broker URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        began = time.monotonic()
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.directory), "--logfile", str(log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(
            lambda: port_answers(self.port),
            BROKER_START_TIMEOUT,
            f"the private redis-server on port {self.port} to answer",
        )
        self.boot_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop the server (SIGTERM to its pid) and wait until it is gone."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


class PrivateRabbit:
    """A RabbitMQ node of one test: own name, ports and data, on loopback only.

    ``rabbitmq-server`` run by root switches to the ``rabbitmq`` user, so the
    node's folder lives under the system temporary directory (a pytest
    ``tmp_path`` is private to root) and is handed to that user.
    """

    def __init__(self) -> None:
        """Prepare the node's folder and ports; nothing runs before :meth:`start`."""
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if shutil.which(tool) is None:
                missing(tool)
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"turnout-restart-{self.port}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="turnout-restart-"))
        os.chmod(self.directory, 0o755)
        for name in ("mnesia", "log"):
            (self.directory / name).mkdir()
        (self.directory / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("rabbitmq")
            except KeyError:
                user = None
            if user is not None:
                for path in (self.directory, *self.directory.iterdir()):
                    os.chown(path, user.pw_uid, user.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: How long a restart of the node with its data in place takes, roughly.
        self.boot_seconds = 3.5

    @property
    def url(self) -> str:
        """The broker URL of the node."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.directory / "node.pid"),
            # Erlang distribution on loopback too, not on every interface.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        })  # fmt: skip
        return env

    def start(self) -> None:
        """Boot the node and return once it accepts AMQP connections."""
        began = time.monotonic()
        self.starts += 1
        log = (self.directory / f"server-{self.starts}.out").open("wb")
        with log:
            self.process = subprocess.Popen(
                ["rabbitmq-server"],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            process = self.process
            if process is not None and process.poll() is not None:
                out = (self.directory / f"server-{self.starts}.out").read_text()
                raise AssertionError(f"rabbitmq-server exited early:\n{out}")
            return port_answers(self.port)

        wait_for(up, BROKER_START_TIMEOUT, f"RabbitMQ node {self.node} to answer")
        if self.starts > 1:
            self.boot_seconds = time.monotonic() - began

    def ctl(self, *args: str, timeout: float = 60) -> None:
        """Run ``rabbitmqctl -n NODE ARGS``."""
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            timeout=timeout,
            check=True,
        )

    def stop(self) -> None:
        """Stop the node with ``rabbitmqctl stop`` and wait for its process."""
        process = self.process
        if process is None:
            return
        self.process = None
        try:
            self.ctl("stop")
        except (subprocess.SubprocessError, OSError):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def remove(self) -> None:
        """Delete the node's folder (only once it is stopped)."""
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_broker(transport: str, tmp_path: Path) -> Iterator[Any]:
    """A running private broker of the kind ``transport`` names."""
    node: PrivateRedis | PrivateRabbit
    if transport == "redis":
        directory = tmp_path / "private-redis"
        directory.mkdir()
        node = PrivateRedis(directory)
    else:
        node = PrivateRabbit()
    try:
        node.start()
        yield node
    finally:
        node.stop()
        if isinstance(node, PrivateRabbit):
            node.remove()


@pytest.fixture
def cluster(broker: Any, private_broker: Any, tmp_path: Path) -> Iterator[Cluster]:
    """Workers on the private broker; results and the store on the shared Redis.

    It replaces the shared-broker ``cluster`` fixture for this module only, so
    that a failing test still shows every worker's log.
    """
    on_private = dataclasses.replace(
        broker, url=private_broker.url, transport_options={}
    )
    token = uuid.uuid4().hex[:8]
    records = tmp_path / "records"
    records.mkdir()
    env = on_private.env() | {
        "TURNOUT_IT_QUEUE_PREFIX": f"turnout-it-{token}",
        "TURNOUT_IT_TASK_QUEUE": f"jobs-{token}",
        "TURNOUT_IT_INTERVAL": "1",
        "TURNOUT_IT_RECORDS": str(records),
    }
    cluster = Cluster(broker.name, env, tmp_path, token)
    try:
        yield cluster
    finally:
        cluster.destroy()


def proven_times(cluster: Cluster, job_id: str) -> dict[str, float]:
    """Return {worker: proven} for every worker that reports holding the job."""
    try:
        replies = cluster.inspect("turnout-jobs")
    except (AssertionError, ValueError):
        return {}
    proven = {}
    for name, reply in replies.items():
        for job in reply.get("ok", []) if isinstance(reply, dict) else []:
            if job.get("id") == job_id and job.get("proven"):
                proven[name] = float(job["proven"])
    return proven


def restart_the_broker_mid_job(
    cluster: Cluster, node: Any, figure: Callable[[str], None]
) -> None:
    """Run a long job through a broker restart and check what must hold."""
    cluster.start(2, concurrency=1)
    job = cluster.send("it.sleeper", JOB_SECONDS)
    first = cluster.wait_started(job.id)
    owner = cluster.owner_of(first)
    # With both pool processes busy, one job waits for a process and one for
    # its countdown, both acknowledged at their first tick. Celery drops such
    # jobs with the lost connection, expecting the broker to deliver them again.
    other = cluster.send("it.sleeper", JOB_SECONDS)
    cluster.wait_started(other.id)
    waiting = cluster.send("it.sleeper", 1.0)
    scheduled = cluster.app.send_task("it.sleeper", args=(1.0,), countdown=25)
    for held in (waiting, scheduled):
        wait_for(
            lambda held=held: any(
                e["event"] == "covered"
                for e in celery_turnout.history(cluster.app, held.id)
            ),
            timeout=10,
            what=f"job {held.id} to be covered while it waits",
        )
    wait_for(
        lambda: any(
            e["event"] == "covered" for e in celery_turnout.history(cluster.app, job.id)
        ),
        timeout=10,
        what=f"job {job.id} to be covered by supervision",
    )
    wait_for(
        lambda: time.time() >= first["time"] + STOP_AFTER,
        STOP_AFTER + 5,
        "the middle of the job",
    )

    stopped_at = time.time()
    node.stop()
    wait_for(
        lambda: all("lost the broker" in w.log() for w in cluster.workers),
        10,
        "every worker's supervision to notice that the broker is gone",
    )
    # What the broker's own boot takes counts as downtime too.
    restart_at = stopped_at + OUTAGE - node.boot_seconds
    wait_for(lambda: time.time() >= restart_at, OUTAGE, "the end of the outage")
    node.start()
    back_at = time.time()
    figure(
        f"{cluster.broker_name}: private broker down for {back_at - stopped_at:.1f} s "
        f"in the middle of a {JOB_SECONDS:.0f} s job"
    )

    # Supervision resumes by itself: the owner proves itself again after the
    # restart, and keeps doing so.
    def events() -> list[str]:
        return [e["event"] for e in celery_turnout.history(cluster.app, job.id)]

    def proven_after(since: float) -> float:
        return max(0.0, proven_times(cluster, job.id).get(owner.name, 0.0) - since)

    # A false takeover shows within the detection bound of the reconnection; a
    # fenced owner no longer lists the job, so stop waiting for its proof then.
    resumed = wait_for(
        lambda: proven_after(back_at) or "taken_over" in events(),
        RESUME_WITHIN,
        f"{owner.name} to prove itself alive again after the restart",
    )
    assert "taken_over" not in events(), events()
    first_proof = back_at + float(resumed)
    wait_for(
        lambda: proven_after(first_proof),
        RESUME_WITHIN,
        f"{owner.name}'s proven time to advance once more",
    )
    figure(
        f"{cluster.broker_name}: supervision proved the owner again "
        f"{first_proof - back_at:.1f} s after the broker came back"
    )

    # The jobs that waited through the outage are not lost.
    for held in (waiting, scheduled):
        assert held.get(timeout=2 * JOB_SECONDS + 30)["seconds"] == 1.0

    # The job is not lost, and it was never taken over.
    outcome: dict[str, Any] = job.get(timeout=JOB_SECONDS + 30)
    assert outcome["attempt"] == 1
    assert outcome["worker"] == owner.name
    assert "taken_over" not in events(), events()
    assert "fenced" not in events(), events()
    assert [r["attempt"] for r in cluster.records.events(job.id, "start")] == [1]
    for worker in cluster.workers:
        assert "takes over" not in worker.log(), worker.name

    # The workers still serve: a job sent after the restart is covered and done.
    after = cluster.send("it.sleeper", 1.5)
    assert after.get(timeout=30)["attempt"] == 1
    assert "covered" in [
        e["event"] for e in celery_turnout.history(cluster.app, after.id)
    ]


def alive(workers: list[Worker]) -> bool:
    """True when every worker's main process still runs."""
    return all(w.process.poll() is None for w in workers)


@pytest.mark.transports("redis")
def test_a_redis_restart_mid_job_causes_no_takeover_and_supervision_resumes(
    cluster: Cluster,
    private_broker: PrivateRedis,
    figure: Callable[[str], None],
) -> None:
    """A Redis broker restart mid-job takes nothing over; supervision resumes."""
    restart_the_broker_mid_job(cluster, private_broker, figure)
    assert alive(cluster.workers)


@pytest.mark.transports("rabbitmq")
def test_a_rabbitmq_restart_mid_job_causes_no_takeover_and_supervision_resumes(
    cluster: Cluster,
    private_broker: PrivateRabbit,
    figure: Callable[[str], None],
) -> None:
    """A RabbitMQ node restart mid-job takes nothing over; supervision resumes."""
    restart_the_broker_mid_job(cluster, private_broker, figure)
    assert alive(cluster.workers)
