"""Shared fixtures: the dev IdP and the demo upstream run once per session."""

from collections.abc import Iterator

import pytest

from tests.support.processes import free_port, mock_idp, whoami


@pytest.fixture(scope="session")
def idp() -> Iterator[str]:
    port = free_port()
    with mock_idp(port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    port = free_port()
    with whoami(port):
        yield f"http://127.0.0.1:{port}"
