"""Private Redis and RabbitMQ servers for one benchmark run, and their counters.

Every benchmark starts its own servers on free loopback ports, so that nothing
else on the machine sends them traffic and their counters (Redis ``INFO
commandstats``, RabbitMQ's global message counters) count this run alone. Each
server runs in a process group of its own and is killed, group and all, when
the ``with`` block ends, on an error or on Ctrl-C too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

#: Seconds a server may take to answer after it was started.
START_TIMEOUT = 120.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``process`` (its own session) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class RedisServer:
    """A ``redis-server`` this run started, keeping nothing on disk."""

    port: int
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        """The ``redis://`` URL of database ``db``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A redis-py client of database ``db``."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def net_bytes(self) -> int:
        """Bytes the server received plus sent since it started (``INFO stats``)."""
        stats = self.client().info("stats")
        return int(stats["total_net_input_bytes"]) + int(
            stats["total_net_output_bytes"]
        )

    def commandstats(self) -> dict[str, int]:
        """Calls per command since the server started (``INFO commandstats``)."""
        info = self.client().info("commandstats")
        return {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in info.items()
        }


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """Start a private ``redis-server`` on a free loopback port; kill it at the end.

    Args:
        directory: Where its log goes.
    """
    port = free_port()
    log = directory / f"redis-{port}.log"
    command = [
        "redis-server", "--bind", "127.0.0.1", "--port", str(port),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", str(directory), "--logfile", str(log),
        "--maxclients", "10000",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = RedisServer(port, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if server.client().ping():
                    break
            except redis.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {log}")
            time.sleep(0.05)
        yield server
    finally:
        _kill_group(process)


@dataclass
class RabbitServer:
    """A RabbitMQ node this run started under a name and ports of its own."""

    node: str
    port: int
    process: subprocess.Popen[bytes]
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The ``amqp://`` URL of the node (guest may log in from loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n NODE ARGS``; return its output."""
        completed = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip
        return completed.stdout

    def counters(self) -> dict[str, int]:
        """The node's global AMQP 0-9-1 message counters, summed over queue types.

        These are the counters RabbitMQ (3.9 and newer) keeps for its
        Prometheus endpoint, read with ``rabbitmqctl eval``: messages received
        (published), routed, delivered (consumed and got), acknowledged,
        ``basic.get`` calls that found nothing, and so on.
        """
        text = self.ctl(
            "eval",
            "lists:foldl(fun({_, M}, Acc) -> maps:fold(fun(K, V, A) -> "
            "maps:update_with(K, fun(X) -> X + V end, V, A) end, Acc, M) end, "
            "#{}, maps:to_list(rabbit_global_counters:overview())).",
        )
        return _erlang_int_map(text)

    def connection_counters(self) -> dict[str, int]:
        """Socket-level counters summed over all client connections of the node."""
        text = self.ctl(
            "list_connections", "recv_cnt", "send_cnt", "recv_oct", "send_oct",
        )
        totals = {"recv_cnt": 0, "send_cnt": 0, "recv_oct": 0, "send_oct": 0}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                continue
            for key, value in zip(totals, parts, strict=True):
                totals[key] += int(value)
        return totals

    def version(self) -> str:
        """The RabbitMQ version of the node."""
        text = self.ctl("eval", "rabbit:product_info().")
        marker = "version => \""
        start = text.find(marker)
        if start < 0:
            return text.strip()
        return text[start + len(marker):].split('"', 1)[0]


def _erlang_int_map(text: str) -> dict[str, int]:
    """Parse ``#{key => 1, other => 2}`` as printed by ``rabbitmqctl eval``."""
    body = text.strip().removeprefix("#{").removesuffix("}")
    result: dict[str, int] = {}
    for item in body.replace("\n", " ").split(","):
        key, sep, value = item.partition("=>")
        if sep and value.strip().isdigit():
            result[key.strip()] = int(value.strip())
    return result


@contextmanager
def rabbit_server(directory: Path) -> Iterator[RabbitServer]:
    """Start a private RabbitMQ node on free loopback ports; kill it at the end.

    The node runs as the ``rabbitmq`` user (for its Erlang cookie) with its own
    node name, AMQP and distribution ports, configuration, and data under a
    temporary directory that is removed afterwards.

    Args:
        directory: Where the node's startup output goes.
    """
    user = pwd.getpwnam("rabbitmq")
    port, dist_port = free_port(), free_port()
    node = f"turnout-bench-{os.getpid()}-{port}@localhost"
    home = Path(tempfile.mkdtemp(prefix="turnout-bench-rabbit-"))
    for sub in ("mnesia", "log"):
        (home / sub).mkdir()
    (home / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{port}\n"
        "loopback_users.guest = true\n"
    )
    (home / "enabled_plugins").write_text("[].\n")
    os.chown(home, user.pw_uid, user.pw_gid)
    for path in home.rglob("*"):
        os.chown(path, user.pw_uid, user.pw_gid)
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": user.pw_dir,
        "LANG": "C.UTF-8",
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "rabbit.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    out = (directory / f"rabbitmq-{port}.log").open("wb")
    process = subprocess.Popen(
        ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
        env=env, cwd=user.pw_dir, user=user.pw_uid, group=user.pw_gid,
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    server = RabbitServer(node, port, process, home, env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"RabbitMQ node {node} did not start; see {out.name}"
                )
            time.sleep(0.2)
        server.ctl("await_startup", "--timeout", "120", timeout=130)
        yield server
    finally:
        _kill_group(process)
        out.close()
        shutil.rmtree(home, ignore_errors=True)
