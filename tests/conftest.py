"""Shared fixtures: the dev IdP and the demo upstream run once per session."""

import re
from collections.abc import Iterator

import pytest

from mitm_outpost.testing.processes import free_port
from tests.support.hostile import BODY_MARKER, QUERY_MARKER
from tests.support.processes import Process, mock_idp, whoami

# What each test file exercises, beyond the product itself (`scripts/test -m product` is the inner loop;
# pyproject.toml describes the markers). A file not named here tests the product.
EXERCISES = {
    # the shipped proxy configs, seeds, example and screenshots, each run for real (the forward-auth
    # configs in front of both runners of the outpost, the seeds', the example as a user runs it)
    "docs_configs": ("test_proxy_configs.py", "test_proxy_upgrades.py", "test_forward_auth.py", "test_seed_configs.py",
                     "test_plugin_example.py", "test_browser.py"),
    "doubles": ("test_authentik_api_double.py", "test_panva_harness.py"),
    "bench": ("test_bench_smoke.py",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(next((mark for mark, files in EXERCISES.items() if item.path.name in files), "product"))


# What no outpost log line may ever contain: a JWT, an outpost cookie value, an authorization code.
SECRET_PATTERNS = (re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}\."),
                   re.compile(r"authentik_proxy_[0-9a-f]{8}(_login)?=[\w-]{16,}"),
                   re.compile(r"[?&]code=[\w-]{8,}"))
# What tests put in query strings and request bodies: a client's data, which no log line may repeat.
CLIENT_DATA_MARKERS = (QUERY_MARKER, BODY_MARKER)


@pytest.fixture(scope="session", autouse=True)
def outpost_logs_hold_no_secrets() -> Iterator[None]:
    """After the whole run: every outpost's output is searched for every secret the tests used."""
    yield
    problems = []
    for process in Process.started:
        if not any("outpost" in arg for arg in process.args):
            continue
        text = process.output
        secrets = set(re.findall(r"(?:client_secret|cookie_secret|session_store_password): (\S{6,})",
                                 _configs(process)))
        problems += [f"{process.args[:3]}: secret {s[:4]}…" for s in secrets if s in text]
        problems += [f"{process.args[:3]}: {p.pattern} matches {m.group(0)[:24]}…"
                     for p in SECRET_PATTERNS for m in [p.search(text)] if m]
        problems += [f"{process.args[:3]}: client data marker {marker}"
                     for marker in CLIENT_DATA_MARKERS if marker in text]
    assert not problems, "secrets in outpost logs:\n" + "\n".join(problems)


def _configs(process: Process) -> str:
    config = getattr(process, "config", None)
    return config.read_text() if config is not None and config.exists() else ""


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
