"""Only `Upgrade: websocket` gets through the docs/forward-auth configs to the application.

Why: in forward-auth mode the reverse proxy, not the outpost, forwards the client's request to the
app; the outpost only answers the auth subrequest. A proxy that passes any Upgrade lets
`Upgrade: h2c` turn an authorised request into a raw tunnel to an h2c-capable app, and the
HTTP/2 requests inside it reach the app with no auth check. So every config must send a
non-WebSocket upgrade on as a plain request (no Upgrade, no `upgrade` Connection token), or
refuse it, and WebSockets must still work, after the same auth check.

Runs every config with the fake auth server and echo app of test_proxy_configs.py, and the
WebSocket echo app of test_transport.py.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.e2e.test_proxy_configs import Seen, Setup, auth, setup, upstream  # noqa: F401 (fixtures)
from tests.e2e.test_transport import ws_upstream  # noqa: F401 (fixture)
from tests.support.proxies import free_port, proxy_for

H2C_SETTINGS = "AAMAAABkAAQCAAAAAAIAAAAA"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key

#: Upgrade requests that must reach the app as plain requests; the header lines are sent in this order.
NOT_WEBSOCKET = {
    "h2c": [("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", H2C_SETTINGS)],
    "foo": [("Upgrade", "foo"), ("Connection", "Upgrade")],
    "websocket-and-h2c": [("Upgrade", "websocket, h2c"), ("Connection", "Upgrade")],
    # A proxy that checks any line but forwards the first passes foo (not h2c: Traefik drops h2c itself).
    "foo-line-then-websocket-line": [("Upgrade", "foo"), ("Upgrade", "websocket"), ("Connection", "Upgrade")],
}


def send_raw(setup: Setup, headers: list[tuple[str, str]], cookie: str = "ok=1") -> int:
    """GET /app/upgrade with exactly these header lines; returns the status.

    http.client sends Connection, Upgrade and repeated lines as given (no `Connection: close`
    added) and returns a 101 as an ordinary status instead of failing on it.
    """
    setup.auth.clear()
    setup.upstream.clear()
    conn = http.client.HTTPConnection("127.0.0.1", setup.port, timeout=10)
    try:
        conn.putrequest("GET", "/app/upgrade", skip_host=True, skip_accept_encoding=True)
        for name, value in [("Host", setup.app_hosts[0]), ("Cookie", cookie), *headers]:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        if response.status != 101:
            response.read()
        return response.status
    finally:
        conn.close()


def upgrade_fields(seen: Seen) -> list[str]:
    """The Upgrade values and `upgrade` Connection tokens the app received (ideally none)."""
    tokens = [t.strip() for value in seen.get_all("Connection") for t in value.split(",")]
    return [f"Upgrade: {v}" for v in seen.get_all("Upgrade")] + [f"Connection: {t}" for t in tokens
                                                                   if t.lower() == "upgrade"]


@pytest.mark.parametrize("case", list(NOT_WEBSOCKET))
def test_other_upgrades_reach_the_app_as_plain_requests(setup: Setup, case: str) -> None:  # noqa: F811
    status = send_raw(setup, NOT_WEBSOCKET[case])
    assert status != 101
    if setup.kind == "envoy" and case != "h2c":
        # Envoy answers upgrade types it is not configured for itself (its codec removes h2c).
        assert status == 403 and setup.upstream.seen == []
        return
    assert status == 200
    got = setup.only_upstream_request()
    assert upgrade_fields(got) == [], f"{setup.name}: the app received {upgrade_fields(got)}"
    assert got.get("X-authentik-username") == "alice"


@contextmanager
def in_front_of(setup: Setup, app_url: str, workdir: Path) -> Iterator[Setup]:
    """The same config as `setup`, on a new port, in front of another app (the WebSocket echo).

    `upstream` still names the HTTP echo app, which this proxy never calls.
    """
    values = {**setup.values, "port": free_port(), "upstream_port": urlsplit(app_url).port}
    with proxy_for(setup.name, workdir, values) as proxy:
        yield replace(setup, proxy=proxy, values=values)


def ws_connect(setup: Setup, cookie: str) -> ClientConnection:
    """A WebSocket to the app host through the proxy (`sock=`: the host name resolves nowhere)."""
    sock = socket.create_connection(("127.0.0.1", setup.port), timeout=10)
    return connect(f"ws://{setup.app_hosts[0]}/socket", sock=sock, proxy=None,
                   additional_headers={"Cookie": cookie}, open_timeout=10)


def test_websockets_work_after_the_auth_check(setup: Setup, ws_upstream: str, tmp_path: Path) -> None:  # noqa: F811
    # RFC 6455 compares the token case-insensitively; some clients send "WebSocket".
    handshake = [("Upgrade", "WebSocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
                 ("Sec-WebSocket-Key", WS_KEY)]
    with in_front_of(setup, ws_upstream, tmp_path) as ws_setup:
        assert send_raw(ws_setup, handshake, cookie="ok=0") == 302  # denied: the login redirect
        assert send_raw(ws_setup, handshake) == 101
        with ws_connect(ws_setup, "ok=1") as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "alice:hello"  # the echo app saw the identity header
