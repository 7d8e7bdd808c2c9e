"""The pytest plugin as an app developer uses it: examples/protected-app's own test suite, run in a
subprocess with the same Python, its own rootdir and conftest, nothing from our tests/ directory.

The example starts its app, the dev IdP, the outpost and nginx itself (through the plugin) and
logs users in through the real OIDC flow; this file only checks that its suite passes.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mitm_outpost.testing import assertions, forward_auth

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "protected-app"
EXPECTED_TESTS = 7  # examples/protected-app/tests/test_app.py
PLUGIN = "mitm_outpost.pytest_plugin"


def _nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def assert_suite_passed(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    if _nginx() is None and os.environ.get("CI") != "true":  # the forward-auth test skips without nginx
        expected = f"{EXPECTED_TESTS - 1} passed, 1 skipped"
    else:
        expected = f"{EXPECTED_TESTS} passed"
    assert result.returncode == 0, output[-6000:]
    assert re.search(rf"\b{expected} in ", output), output[-3000:]


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == PLUGIN]


def test_example_suite_passes_with_the_plugin_named() -> None:
    """`-p mitm_outpost.pytest_plugin`: works whether or not the entry point is installed."""
    assert_suite_passed(run_example("-p", PLUGIN))


def test_example_suite_passes_through_the_entry_point() -> None:
    """Plain `pytest`, as after `pip install mitm-outpost`: the pytest11 entry point loads the plugin."""
    assert _entry_points(), "the pytest11 entry point of mitm-outpost is not installed (scripts/test installs it)"
    assert_suite_passed(run_example())


def test_entry_point_name_is_the_module_name() -> None:
    """pytest refuses a module registered twice under two names: with the entry point named anything
    else, `pytest -p mitm_outpost.pytest_plugin` (the documented way without the entry point) would crash."""
    assert [ep.name for ep in _entry_points()] == [PLUGIN]


def test_documented_nginx_config_is_the_shipped_one() -> None:
    """docs/forward-auth/nginx-single.conf is a link to the package's template (installs have no docs/)."""
    documented = ROOT / "docs" / "forward-auth" / "nginx-single.conf"
    assert documented.is_symlink() and documented.resolve() == Path(str(forward_auth.TEMPLATE)).resolve()


def test_header_helpers_accept_every_documented_shape() -> None:
    pairs = [["X-authentik-username", "alice"], ["X-authentik-groups", "users|admins"], ["X-Team", "blue"]]
    for source in ({"headers": pairs}, {"headers": dict(pairs)}, dict(pairs), pairs):
        seen = assertions.assert_identity(source, "alice", groups=["admins", "users"], headers={"x-team": "blue"})
        assert seen["x-authentik-username"] == "alice"
    with pytest.raises(AssertionError, match="X-authentik-groups: expected \\['admins'\\]"):
        assertions.assert_identity(pairs, groups=["admins"])
    assertions.assert_no_identity({"headers": {"X-authentik-username": "", "Host": "app"}})
    with pytest.raises(AssertionError, match="received an identity"):
        assertions.assert_no_identity(pairs)
