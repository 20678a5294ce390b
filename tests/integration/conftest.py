"""Fixtures that give each integration test real brokers and real worker processes.

Every test runs once per broker (``filesystem``, ``redis``, ``rabbitmq``) unless it
is marked ``@pytest.mark.transports(...)``; ``pytest --transport NAME`` selects
brokers. An unreachable broker skips its tests, except under CI, where it fails them.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster

pytestmark = pytest.mark.integration

#: Every broker, in the order tests run on them.
TRANSPORTS = ("filesystem", "redis", "rabbitmq")

REDIS = ("127.0.0.1", 6379)
RABBITMQ = ("127.0.0.1", 5672)

#: Figures measured by the tests, shown at the end of the run.
FIGURES: list[str] = []


@dataclass
class Broker:
    """How to reach one broker, its result backend and turnout's claim store."""

    name: str
    url: str
    result_backend: str
    store_url: str
    transport_options: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Return the ``TURNOUT_IT_*`` variables that select this broker."""
        return {
            "TURNOUT_IT_BROKER_URL": self.url,
            "TURNOUT_IT_TRANSPORT_OPTIONS": json.dumps(self.transport_options),
            "TURNOUT_IT_RESULT_BACKEND": self.result_backend,
            "TURNOUT_IT_STORE_URL": self.store_url,
        }


def pytest_configure(config: pytest.Config) -> None:
    """Declare the ``transports`` marker."""
    config.addinivalue_line(
        "markers", "transports(*names): run this test on these brokers only"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that asks for ``transport`` once per selected broker."""
    if "transport" not in metafunc.fixturenames:
        return
    selected = metafunc.config.getoption("--transport") or list(TRANSPORTS)
    marker = metafunc.definition.get_closest_marker("transports")
    allowed = marker.args if marker else selected
    names = [name for name in selected if name in allowed]
    metafunc.parametrize("transport", names)


def _reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


def _require(name: str, *addresses: tuple[str, int]) -> None:
    for host, port in addresses:
        if not _reachable((host, port)):
            message = f"{name} needs {host}:{port}, which does not answer"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


@pytest.fixture
def broker(transport: str, tmp_path: Path) -> Broker:
    """The broker of this run of the test, checked to be reachable."""
    if transport == "filesystem":
        data = tmp_path / "broker" / "data"
        control = tmp_path / "broker" / "control"
        results = tmp_path / "broker" / "results"
        store = tmp_path / "broker" / "store"
        for directory in (data, control, results, store):
            directory.mkdir(parents=True)
        return Broker(
            name=transport,
            url="filesystem://",
            result_backend=f"file://{results}",
            store_url=f"file://{store}",
            transport_options={
                "data_folder_in": str(data),
                "data_folder_out": str(data),
                "control_folder": str(control),
                "polling_interval": 0.05,
            },
        )
    if transport == "redis":
        _require(transport, REDIS)
        return Broker(
            name=transport,
            url="redis://127.0.0.1:6379/1",
            result_backend="redis://127.0.0.1:6379/2",
            store_url="redis://127.0.0.1:6379/3",
        )
    _require(transport, RABBITMQ, REDIS)
    return Broker(
        name=transport,
        url="amqp://guest:guest@127.0.0.1:5672//",
        result_backend="redis://127.0.0.1:6379/2",
        store_url="redis://127.0.0.1:6379/3",
    )


@pytest.fixture
def cluster(broker: Broker, tmp_path: Path) -> Iterator[Cluster]:
    """An app on ``broker`` with a 1 s supervise interval, and its workers.

    Each test gets its own job queue and turnout queue prefix, so no test sees
    another's messages. Workers are killed, process group and all, at teardown.
    """
    token = uuid.uuid4().hex[:8]
    records = tmp_path / "records"
    records.mkdir()
    env = broker.env() | {
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


@pytest.fixture
def figure() -> Any:
    """Record a measured figure: printed now and listed at the end of the run."""

    def record(text: str) -> None:
        print(text)
        FIGURES.append(text)

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach every worker's log to the report of a test that failed."""
    report = yield
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(cluster, Cluster):
        for name, text in cluster.logs():
            report.sections.append((f"worker {name} log", text[-30000:]))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the figures the tests measured."""
    if FIGURES:
        terminalreporter.section("measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
