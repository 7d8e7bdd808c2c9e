"""Forward auth through real nginx, Traefik, Caddy and Envoy, with the configs of docs/forward-auth.

Each proxy runs the documented file with only hosts and ports filled in, in front of the demo
app, asking a real outpost (mitmdump + our addons) that logs users in at the dev IdP.
"""

from __future__ import annotations

import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import pytest

from mitm_outpost import names
from mitm_outpost.testing.processes import free_port
from tests.support.processes import RUNNERS, Outpost, follow_login
from tests.support.proxies import FORWARD_AUTH_CONFIGS, ProxyProcess, proxy_for, require_or_skip, standard_values

DOMAIN = "example.test"
PROGRAMS = {"nginx": "nginx", "traefik": "traefik", "Caddyfile": "caddy", "envoy": "envoy"}


class LoopbackTransport(httpx2.HTTPTransport):
    """Every host name is this machine: lets a client use app.example.test like a browser would."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        original = request.url  # the cookie jar judges cookies by it: keep the name the browser used
        request.url = original.copy_with(host="127.0.0.1")
        try:
            return super().handle_request(request)
        finally:
            request.url = original


def browser() -> httpx2.Client:
    return httpx2.Client(transport=LoopbackTransport(), follow_redirects=False, headers={"Accept": "text/html"},
                         timeout=15)


@dataclass
class Setup:
    template: str
    mode: str
    proxy: ProxyProcess
    outpost: Outpost
    idp: str

    @property
    def port(self) -> int:
        return self.proxy.port

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}.{DOMAIN}:{self.port}{path}"

    @property
    def app(self) -> str:
        return "app" if self.mode == "single" else "a"

    @property
    def auth_host(self) -> str:
        return "app" if self.mode == "single" else "auth"


def login(client: httpx2.Client, setup: Setup, url: str, user: str = "alice") -> httpx2.Response:
    """Follow redirects from a protected URL through the dev IdP's login; returns the final answer."""
    return follow_login(client, url, setup.idp, user)


def received(response: httpx2.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    seen: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


@pytest.fixture(scope="module", params=[(t, tool) for t in FORWARD_AUTH_CONFIGS for tool in RUNNERS],
                ids=[f"{t}-{tool}" for t in FORWARD_AUTH_CONFIGS for tool in RUNNERS])
def setup(request: pytest.FixtureRequest, idp: str, upstream: str) -> Iterator[Setup]:
    template, tool = request.param
    require_or_skip(PROGRAMS[template.split("-")[0]])
    mode = FORWARD_AUTH_CONFIGS[template][1]
    proxy_port, outpost_port = free_port(), free_port()
    client_id = f"fwd-{mode}"
    entry = {
        "name": f"fwd-{mode}", "client_id": client_id, "client_secret": "fwd-secret", "issuer": idp,
        "mode": f"forward_{mode}",
        "external_host": f"http://{'app' if mode == 'single' else 'auth'}.{DOMAIN}:{proxy_port}",
        "skip_path_regex": "^/headers/public$" if mode == "single" else r"^http://b\.example\.test:\d+/headers/public$",
    }
    if mode == "domain":
        entry["cookie_domain"] = DOMAIN
    up = urllib.parse.urlsplit(upstream)
    values = standard_values(port=proxy_port, outpost=("127.0.0.1", outpost_port), upstream=(up.hostname, up.port),
                             domain=DOMAIN, cookie_name=names.cookie_name(client_id))
    with Outpost([entry], outpost_port, tool=tool) as outpost:
        with proxy_for(template, tempfile.mkdtemp(prefix="fwd-"), values) as proxy:
            yield Setup(template, mode, proxy, outpost, idp)


def test_login_round_trip_and_identity_headers(setup: Setup) -> None:
    client = browser()
    final = login(client, setup, setup.url(setup.app, "/headers?x=1"))
    seen = received(final)
    assert final.url == httpx2.URL(setup.url(setup.app, "/headers?x=1"))
    assert seen["x-authentik-username"] == ["alice"]
    assert seen["x-authentik-groups"] == ["admins|users"]
    assert seen["x-authentik-email"] == ["alice@example.test"]
    assert seen["x-authentik-meta-provider"] == [f"fwd-{setup.mode}"]
    assert seen["x-auth-username"] == ["alice"]
    assert seen["x-authentik-jwt"][0].count(".") == 2
    if setup.template.startswith("nginx"):  # the documented nginx configs keep the outpost's cookies from the app
        assert "authentik_proxy_" not in " ".join(seen.get("cookie", []))


def test_spoofed_headers_do_not_reach_the_app(setup: Setup) -> None:
    client = browser()
    login(client, setup, setup.url(setup.app, "/headers"))
    spoofs = {"X-authentik-username": "evil", "X-authentik-groups": "admins", "X-Auth-Username": "evil",
              "X-Forwarded-User": "evil", "X-authentik-meta-provider": "forged", "X_authentik_email": "evil@x",
              "X-Forwarded-Host": "evil.example", "X-Original-URL": "http://evil.example/"}
    seen = received(client.get(setup.url(setup.app, "/headers"), headers=spoofs))
    assert seen["x-authentik-username"] == ["alice"] and seen["x-authentik-groups"] == ["admins|users"]
    assert "evil.example" not in str(seen.get("x-forwarded-host")) and "x_authentik_email" not in seen
    assert seen["x-auth-username"] == ["alice"] and seen["x-forwarded-user"] == ["alice"]
    public = "b" if setup.mode == "domain" else setup.app
    anonymous = received(browser().get(setup.url(public, "/headers/public"), headers=spoofs))
    assert not {"evil", "admins", "forged"} & {v for vs in anonymous.values() for v in vs}


def test_unauthenticated_requests_never_reach_the_app(setup: Setup) -> None:
    for path in ("/headers", "/outpost.goauthentik.io/../headers", "/%2e%2e/headers", "//headers", "/headers;x=1",
                 "/headers/public/../../headers", "/headers/public%2F..%2F..%2Fheaders",
                 "/headers/public;/../../headers"):
        response = browser().get(setup.url(setup.app, path))
        assert response.status_code == (400 if path == "/%2e%2e/headers" and setup.template.startswith("nginx")
                                        else 302), (path, response.status_code, response.text[:200])  # nginx: above /
        if response.status_code == 302:
            assert "/headers" not in response.headers.get("content-type", "")


def test_foreign_rd_ends_on_the_external_host(setup: Setup) -> None:
    for rd in ("https://evil.test/", "//evil.test/", "/\\evil.test", f"http://evil{DOMAIN}:{setup.port}/",
               f"http://{DOMAIN}.evil.test:{setup.port}/"):
        client = browser()
        start = setup.url(setup.auth_host, "/outpost.goauthentik.io/start?" + urllib.parse.urlencode({"rd": rd}))
        final = login(client, setup, start)
        assert str(final.url) == setup.url(setup.auth_host, "/"), rd


def test_relative_rd_resolves_on_the_external_host(setup: Setup) -> None:
    client = browser()
    final = login(client, setup, setup.url(setup.auth_host, "/outpost.goauthentik.io/start?rd=/headers"))
    assert str(final.url) == setup.url(setup.auth_host, "/headers")


def test_sign_out_ends_the_session_everywhere(setup: Setup) -> None:
    client = browser()
    login(client, setup, setup.url(setup.app, "/headers"))
    hosts = [setup.app] if setup.mode == "single" else ["a", "b"]
    for host in hosts:
        assert received(client.get(setup.url(host, "/headers")))["x-authentik-username"] == ["alice"]
    out = client.get(setup.url(hosts[-1], "/outpost.goauthentik.io/sign_out"))
    assert out.status_code == 302 and "end_session" in out.headers["location"]
    for host in hosts:
        assert client.get(setup.url(host, "/headers")).status_code == 302


def test_outpost_down_means_denied(setup: Setup) -> None:
    client = browser()
    login(client, setup, setup.url(setup.app, "/headers"))
    setup.outpost.stop()
    try:
        response = client.get(setup.url(setup.app, "/headers"))
        assert response.status_code == {"nginx": 500, "traefik": 500, "Caddyfile": 502, "envoy": 403}[
            setup.template.split("-")[0]], response.status_code  # each proxy's own answer when its auth request fails
        assert "alice" not in response.text
    finally:
        setup.outpost.start()


def test_login_keeps_the_whole_query(setup: Setup) -> None:
    """Notably through nginx, whose sign-in location appends the original URL to ?rd= unencoded."""
    client = browser()
    final = login(client, setup, setup.url(setup.app, "/headers?a=1&b=2"))
    assert final.url == httpx2.URL(setup.url(setup.app, "/headers?a=1&b=2"))


def test_forward_auth_only_answers_trusted_proxies(idp: str) -> None:
    port = free_port()
    entry = {"name": "t", "mode": "forward_single", "external_host": "http://app.example.test", "client_id": "t",
             "client_secret": "t", "issuer": idp}
    with Outpost([entry], port, extra=["--set", "trusted_proxies=10.9.0.0/16"]) as outpost:
        headers = {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "app.example.test", "X-Forwarded-Uri": "/"}
        response = httpx2.get(f"{outpost.url}/outpost.goauthentik.io/auth/traefik", headers=headers)
        assert response.status_code == 403
        assert "untrusted peer 127.0.0.1" in outpost.output
