"""How the outpost plugin finds this app: start it on a free port for the whole test session."""

import sys
from pathlib import Path

import pytest

from mitm_outpost.testing.app import run_app

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="session")
def outpost_upstream():
    """The app, started once; the outpost (and nginx) forward to this URL."""
    with run_app([sys.executable, str(APP), "--port", "{port}"]) as app:
        yield app.url


@pytest.fixture(scope="session")
def outpost_provider():
    """Provider fields as in authentik: the health check needs no login."""
    return {"skip_path_regex": "^/health$"}
