"""Options shared by the whole test suite."""

from __future__ import annotations

import pytest

#: The brokers the integration tests know how to run against.
TRANSPORTS = ("filesystem", "redis", "rabbitmq")


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--transport`` to choose the brokers of the integration tests."""
    parser.addoption(
        "--transport",
        action="append",
        choices=TRANSPORTS,
        default=None,
        help="run integration tests on this broker only (repeatable; default: all)",
    )
