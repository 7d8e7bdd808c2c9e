"""The outpost's identity headers survive a standard reverse proxy behind it (proxy mode).

Why: internal_host is often another proxy (Caddy, nginx, an ingress), not the app itself. Every
RFC 9110 proxy deletes the fields that a Connection header names (§7.6.1). If the outpost
forwards the client's `Connection: X-authentik-username, X-authentik-groups`, the next hop
removes exactly those identity headers after the outpost set them, and the app gets an
authorised request without a username or groups. So the outpost must drop the client's Connection header, and
the fields it names, before adding its own headers.

Chain: client -> outpost (mitmdump or the lean runner) -> real Caddy -> recording echo app.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.e2e.test_proxy_configs import EchoHandler, Running, Seen
from tests.support.processes import Outpost, provider_entry
from tests.support.proxies import Caddy, require_or_skip

NAMED = "X-authentik-username, X-authentik-groups"


def next_hop_caddyfile(port: int, app_port: int) -> str:
    """Caddy as a plain next hop: reverse_proxy only, any Host, no admin endpoint, no HTTPS."""
    return (
        "{\n\tadmin off\n\tauto_https off\n}\n\n"
        f"http://:{port} {{\n\tbind 127.0.0.1\n\treverse_proxy 127.0.0.1:{app_port}\n}}\n"
    )


@pytest.fixture(scope="module")
def app() -> Iterator[Running]:
    server = Running(EchoHandler)
    yield server
    server.close()


@pytest.fixture(scope="module")
def caddy(app: Running, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Caddy]:
    require_or_skip("caddy")
    port = free_port()
    with Caddy(next_hop_caddyfile(port, app.port), tmp_path_factory.mktemp("caddy"), port=port) as proxy:
        yield proxy


def app_request(app: Running) -> Seen:
    """The one request the app got, after checking it came through Caddy."""
    [seen] = app.seen
    assert seen.get("Via") == "1.1 Caddy", seen.headers
    return seen


@pytest.mark.parametrize("tool", ["mitmdump", "lean"])
def test_connection_header_cannot_strip_identity_headers(idp: str, app: Running, caddy: Caddy, tool: str) -> None:
    port = free_port()
    with Outpost([provider_entry("hop", port, caddy.base_url, idp)], port, tool=tool) as outpost:
        client = browser()
        mock_login(client, f"{outpost.url}/")
        for connection in (None, NAMED):  # first without, to show the chain itself delivers them
            app.clear()
            response = client.get(f"{outpost.url}/page", headers={"Connection": connection} if connection else {})
            assert response.status_code == 200, response.text
            seen = app_request(app)
            names = [k for k, _ in seen.headers]  # names only: the values hold a JWT
            assert (seen.get("X-authentik-username"), seen.get("X-authentik-groups")) == ("alice", "admins|users"), (
                f"{tool}, client Connection: {connection}: the app behind Caddy got only {names}")
