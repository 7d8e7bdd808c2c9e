"""pytest plugin: test your own app behind a real outpost, with real logins (docs/testing-your-app.md).

Installed with the package (entry point ``pytest11``); without it, ``pytest -p mitm_outpost.pytest_plugin``.
Once per test session, and only when a test asks: the development IdP, your app (a URL, or a command
started on a free port), the outpost in proxy mode in front of it, and for forward auth nginx with
docs/forward-auth/nginx-single.conf asking a second outpost. Users are declared by the test that logs
them in, so tests do not depend on each other's users. The machinery is `mitm_outpost.testing`; every
fixture name starts with ``outpost_``, so none takes a name of your suite's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest

from . import names
from .testing.app import run_app
from .testing.forward_auth import find_nginx
from .testing.idp import DevIdP
from .testing.outpost import Clients, ProtectedApp


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("outpost_upstream", "URL of the (already running) app to put behind the outpost", default="")
    parser.addini("outpost_upstream_command",
                  "command that starts the app; {port} is replaced by a free port, {python} by the running Python",
                  default="")
    parser.addini("outpost_nginx_template",
                  "nginx http{} snippet with {{port}} {{domain}} {{outpost_host}} {{outpost_port}} {{upstream_host}} "
                  "{{upstream_port}} placeholders (default: docs/forward-auth/nginx-single.conf, from the package)",
                  default="")


def _ini(config: pytest.Config, name: str) -> str:
    return str(config.getini(name) or "").strip()


@pytest.fixture(scope="session")
def outpost_upstream(pytestconfig: pytest.Config) -> Iterator[str]:
    """The app's URL. Default: the ini option `outpost_upstream`, or `outpost_upstream_command` started on a
    free port (cwd: the rootdir). Override this fixture (session scope) to start your app yourself."""
    if url := _ini(pytestconfig, "outpost_upstream"):
        yield url
    elif command := _ini(pytestconfig, "outpost_upstream_command"):
        with run_app(command, cwd=pytestconfig.rootpath) as app:
            yield app.url
    else:
        pytest.fail("mitm_outpost.pytest_plugin: tell it where your app is: override the `outpost_upstream` fixture, "
                    "or set `outpost_upstream` (URL) or `outpost_upstream_command` in the pytest ini options",
                    pytrace=False)


@pytest.fixture(scope="session")
def outpost_provider() -> dict[str, Any]:
    """Extra provider fields (authentik's names), e.g. ``{"skip_path_regex": "^/health$"}``. Override it
    (session scope); it applies to proxy mode and forward auth alike."""
    return {}


@pytest.fixture(scope="session")
def outpost_idp() -> Iterator[DevIdP]:
    """The development IdP: ``.url``, ``.set_user(sub, claims)``."""
    try:
        idp = DevIdP()
    except RuntimeError as e:
        pytest.fail(f"mitm_outpost.pytest_plugin: {e}", pytrace=False)
    with idp:
        yield idp


@pytest.fixture(scope="session")
def outpost_app(outpost_idp: DevIdP, outpost_upstream: str, outpost_provider: dict[str, Any]) -> Iterator[ProtectedApp]:
    """The outpost in proxy mode in front of the app, at ``outpost_app.url``."""
    with ProtectedApp(outpost_idp, outpost_upstream, outpost_provider) as app:
        yield app


@pytest.fixture(scope="session")
def outpost_nginx(pytestconfig: pytest.Config, outpost_idp: DevIdP, outpost_upstream: str,
                  outpost_provider: dict[str, Any]) -> Iterator[ProtectedApp]:
    """nginx at ``http://app.localtest:<port>`` in front of the app, asking an outpost in forward_single mode."""
    if not find_nginx():  # a skip where nginx may be missing; in CI (CI=true) a missing program fails the run
        missing = "forward-auth tests need nginx (with auth_request) on PATH, e.g. apt-get install nginx"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    template = _ini(pytestconfig, "outpost_nginx_template")
    provider = {k: v for k, v in outpost_provider.items() if k not in ("mode", "internal_host")}
    with ProtectedApp(outpost_idp, outpost_upstream, provider, mode=names.Mode.FORWARD_SINGLE.value,
                      nginx_template=(pytestconfig.rootpath / template).read_text() if template else None) as app:
        yield app


@pytest.fixture
def outpost_clients(outpost_app: ProtectedApp) -> Iterator[Clients]:
    """Clients of the proxy-mode outpost: ``.login_as(...)``, ``.anonymous()``, ``.url``."""
    clients = Clients(outpost_app)
    yield clients
    clients.close()


@pytest.fixture
def outpost_login_as(outpost_clients: Clients) -> Callable[..., httpx2.Client]:
    """``outpost_login_as(username, groups=..., entitlements=..., attributes=..., ak_proxy=..., **claims)``:
    an httpx2 client on the outpost with a real session of that user."""
    return outpost_clients.login_as


@pytest.fixture
def outpost_anonymous(outpost_clients: Clients) -> httpx2.Client:
    """An httpx2 client on the outpost without a session (asks for HTML, does not follow redirects)."""
    return outpost_clients.anonymous()


@pytest.fixture
def outpost_forward_auth_nginx(outpost_nginx: ProtectedApp) -> Iterator[Clients]:
    """`outpost_clients` behind nginx: ``.login_as(...)``, ``.anonymous()``, ``.url``."""
    clients = Clients(outpost_nginx)
    yield clients
    clients.close()
