"""Proves the docs/forward-auth proxy configs with a FAKE auth server (not our outpost).

Each of the 8 configs (nginx, Traefik, Caddy, Envoy x single application / domain level) runs
for real between a client, a fake outpost and an echoing upstream. The tests pin down:
- an allowed request reaches the upstream with the auth answer's identity headers, replacing
  client-spoofed copies, and the auth answer's Set-Cookie reaches the client;
- a 2xx answer WITHOUT identity headers still removes client-spoofed copies;
- a denied request: nginx turns the 401 into a 302 to /outpost.goauthentik.io/start?rd=...,
  the others relay the auth server's 302 (Location + Set-Cookie) verbatim;
- exactly what the auth endpoint receives (method, path, Host, X-Original-URL, X-Forwarded-*),
  including that client-sent X-Forwarded-*/X-Original-* cannot steer it. The outpost's
  forward-auth handlers rely on these facts; docs/forward-auth/README.md lists them.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2 as httpx
import pytest

from tests.support.proxies import (
    FORWARD_AUTH_CONFIGS,
    IDENTITY_HEADERS,
    LEGACY_HEADERS,
    Nginx,
    ProxyProcess,
    free_port,
    proxy_for,
    render,
    require_or_skip,
    standard_values,
)

DOMAIN = "example.test"
COOKIE_NAME = "authentik_proxy_test"
LOGIN_URL = "http://idp.example.test/application/o/authorize/?client_id=x&state=fake-state"
AUTH_PREFIX = "/outpost.goauthentik.io/auth/"
APP_PATH = "/app/page?q=1&x=%2F"

IDENTITY = {
    "X-authentik-username": "alice",
    "X-authentik-groups": "admins|users",
    "X-authentik-entitlements": "billing",
    "X-authentik-email": "alice@example.test",
    "X-authentik-name": "Alice Example",
    "X-authentik-uid": "5f2b0c1d9e",
    "X-authentik-jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
    "X-authentik-meta-jwks": "http://auth.example.test/application/o/test-app/jwks/",
    "X-authentik-meta-outpost": "fake-outpost",
    "X-authentik-meta-provider": "fake-provider",
    "X-authentik-meta-app": "test-app",
    "X-authentik-meta-version": "goauthentik.io/outpost/fake",
    "X-Auth-Username": "alice",
    "X-Auth-Groups": "admins|users",
    "X-Forwarded-Email": "alice@example.test",
    "X-Forwarded-Preferred-Username": "alice",
    "X-Forwarded-User": "5f2b0c1d9e",
}
assert set(IDENTITY) == set(IDENTITY_HEADERS) | set(LEGACY_HEADERS)

#: what a client tries to smuggle in on every request
SPOOFED = {name: "evil" for name in IDENTITY} | {
    "X-Forwarded-Host": "evil.test",
    "X-Forwarded-Uri": "/evil-uri",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Method": "DELETE",
    "X-Original-URL": "http://evil.test/evil-url",
    "X-Original-URI": "/outpost.goauthentik.io/evil-uri",
}


# --------------------------------------------------------------------------- fake servers


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        seen = Seen(self.command, self.path, list(self.headers.items()), self._body())
        with self.server.lock:
            self.server.seen.append(seen)
        status, headers, body = self.answer(seen)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def answer(self, seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        raise NotImplementedError


class FakeAuthHandler(_Handler):
    """Plays the outpost: /outpost.goauthentik.io/auth/* decides by the `ok` cookie.

    ok=1 -> 200 + identity headers + Set-Cookie; ok=bare -> 200 without headers;
    otherwise 401 for /auth/nginx, 302 to LOGIN_URL for the others (+ Set-Cookie).
    Other paths answer 200 "outpost:<path>" (start, callback, sign_out ...).
    """

    def answer(self, seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        path = urlsplit(seen.path).path
        if not path.startswith(AUTH_PREFIX):
            return 200, [("Content-Type", "text/plain"), ("X-Fake-Outpost", "1")], f"outpost:{seen.path}".encode()
        jar: SimpleCookie = SimpleCookie()
        for value in seen.get_all("Cookie"):
            jar.load(value)
        ok = jar["ok"].value if "ok" in jar else None
        if ok == "1":
            headers = list(IDENTITY.items()) + [("Set-Cookie", f"{COOKIE_NAME}=refreshed; Path=/; HttpOnly")]
            return 200, headers, b""
        if ok == "bare":
            return 200, [], b""
        cookie = ("Set-Cookie", f"{COOKIE_NAME}=pending; Path=/; HttpOnly")
        if path.startswith(AUTH_PREFIX + "nginx"):
            return 401, [("Content-Type", "text/plain"), cookie], b"unauthorized request\n"
        return 302, [("Location", LOGIN_URL), ("Content-Type", "text/html"), cookie], b"<a>Found</a>\n"


class EchoHandler(_Handler):
    """The protected application: echoes what it received as JSON and sets its own cookie."""

    def answer(self, seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        body = json.dumps({"method": seen.method, "path": seen.path, "headers": seen.headers}).encode()
        return 200, [("Content-Type", "application/json"), ("Set-Cookie", "app_cookie=1; Path=/")], body


class Running:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = _Server(handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def seen(self) -> list[Seen]:
        with self.httpd.lock:
            return list(self.httpd.seen)

    def clear(self) -> None:
        with self.httpd.lock:
            self.httpd.seen.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def auth() -> Iterator[Running]:
    server = Running(FakeAuthHandler)
    yield server
    server.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Running]:
    server = Running(EchoHandler)
    yield server
    server.close()


@dataclass
class Setup:
    name: str
    mode: str
    proxy: ProxyProcess
    auth: Running
    upstream: Running
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.proxy.program

    @property
    def port(self) -> int:
        return self.proxy.port

    def host(self, name: str) -> str:
        return f"{name}.{DOMAIN}:{self.port}"

    @property
    def app_hosts(self) -> list[str]:
        return [self.host("app")] if self.mode == "single" else [self.host("a"), self.host("b")]

    def request(self, method: str, host: str, path: str, headers: dict[str, str] | None = None,
                content: bytes | None = None) -> httpx.Response:
        self.auth.clear()
        self.upstream.clear()
        with httpx.Client(follow_redirects=False, trust_env=False, timeout=10) as client:
            return client.request(method, f"http://127.0.0.1:{self.port}{path}",
                                  headers={"Host": host, **(headers or {})}, content=content)

    def auth_requests(self) -> list[Seen]:
        return [s for s in self.auth.seen if urlsplit(s.path).path.startswith(AUTH_PREFIX)]

    def only_auth_request(self) -> Seen:
        seen = self.auth_requests()
        assert len(seen) == 1, f"expected one auth request, got {[s.path for s in seen]}"
        return seen[0]

    def only_upstream_request(self) -> Seen:
        seen = self.upstream.seen
        assert len(seen) == 1, f"expected one upstream request, got {[s.path for s in seen]}"
        return seen[0]


@pytest.fixture(scope="module", params=list(FORWARD_AUTH_CONFIGS))
def setup(request: pytest.FixtureRequest, auth: Running, upstream: Running,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    name = request.param
    cls, mode = FORWARD_AUTH_CONFIGS[name]
    require_or_skip(cls.program)
    values = standard_values(port=free_port(), outpost=("127.0.0.1", auth.port),
                             upstream=("127.0.0.1", upstream.port), domain=DOMAIN, cookie_name=COOKIE_NAME)
    proxy = proxy_for(name, tmp_path_factory.mktemp(name.replace(".", "-")), values)
    with proxy:
        yield Setup(name, mode, proxy, auth, upstream, values)


def set_cookies(resp: httpx.Response) -> list[str]:
    return resp.headers.get_list("set-cookie")


# --------------------------------------------------------------------------- tests


def test_allowed_request_gets_identity_headers_and_cookie(setup: Setup) -> None:
    for host in setup.app_hosts:
        resp = setup.request("GET", host, APP_PATH, {"Cookie": "ok=1", **SPOOFED})
        assert resp.status_code == 200, resp.text
        got = setup.only_upstream_request()
        assert got.path == APP_PATH
        assert got.get("Host") == host
        for name, value in IDENTITY.items():
            assert got.get_all(name) == [value], f"{setup.name}: upstream {name}={got.get_all(name)}"
        # the auth answer's Set-Cookie reaches the client, next to the application's own cookie
        cookies = set_cookies(resp)
        assert any(c.startswith(f"{COOKIE_NAME}=refreshed") for c in cookies), cookies
        assert any(c.startswith("app_cookie=1") for c in cookies), cookies


def test_upstream_forwarded_headers_are_not_client_controlled(setup: Setup) -> None:
    """X-Forwarded-Host/-Proto at the application come from the proxy, never from the client
    (Envoy removes X-Forwarded-Host instead of setting it)."""
    host = setup.app_hosts[0]
    setup.request("GET", host, APP_PATH, {"Cookie": "ok=1", **SPOOFED})
    got = setup.only_upstream_request()
    assert got.get("X-Forwarded-Host") == (None if setup.kind == "envoy" else host)
    assert got.get("X-Forwarded-Proto") == "http"
    for name in ("X-Original-URL", "X-Original-URI", "X-Forwarded-Uri", "X-Forwarded-Method"):
        # not used by apps, passed through as the client sent them (nginx/Caddy/Envoy) or not
        assert got.get(name) in (None, SPOOFED[name])


def test_bare_2xx_still_strips_spoofed_identity_headers(setup: Setup) -> None:
    resp = setup.request("GET", setup.app_hosts[0], APP_PATH, {"Cookie": "ok=bare", **SPOOFED})
    assert resp.status_code == 200, resp.text
    got = setup.only_upstream_request()
    for name in IDENTITY:
        assert got.get_all(name) in ([], [""]), f"{setup.name}: client value of {name} reached the app"


def test_denied_request(setup: Setup) -> None:
    host = setup.app_hosts[0]
    resp = setup.request("GET", host, APP_PATH, SPOOFED)
    assert setup.upstream.seen == []
    assert any(c.startswith(f"{COOKIE_NAME}=pending") for c in set_cookies(resp)), resp.headers
    if setup.kind == "nginx":
        # 401 from the outpost -> 302 to /start with the original URL as rd (not escaped)
        assert resp.status_code == 302
        location = urlsplit(resp.headers["location"])
        start_host = host if setup.mode == "single" else setup.host("auth")
        assert (location.scheme, location.netloc, location.path) == (
            "http", start_host, "/outpost.goauthentik.io/start")
        assert location.query == f"rd=http://{host}{APP_PATH}"
        assert parse_qs(location.query)["rd"] == [f"http://{host}/app/page?q=1"]  # `&x=...` splits off!
    else:
        # the auth server's 302 is relayed verbatim
        assert resp.status_code == 302
        assert resp.headers["location"] == LOGIN_URL
        assert resp.text == "<a>Found</a>\n"


def test_outpost_paths_skip_auth(setup: Setup) -> None:
    """/outpost.goauthentik.io/* on the app host (single) or anything on auth.<domain> (domain)."""
    host = setup.app_hosts[0] if setup.mode == "single" else setup.host("auth")
    path = "/outpost.goauthentik.io/start?rd=http%3A%2F%2Fapp.example.test%2F"
    resp = setup.request("GET", host, path)
    assert resp.status_code == 200 and resp.headers.get("x-fake-outpost") == "1", resp.text
    assert resp.text == f"outpost:{path}"
    assert setup.auth_requests() == []
    [seen] = setup.auth.seen
    assert seen.get("Host") == host
    if setup.kind in ("nginx", "caddy"):
        assert seen.get("X-Forwarded-Host") == host
    if setup.mode == "domain":
        cb = "/outpost.goauthentik.io/callback?X-authentik-auth-callback=true&code=c&state=s"
        resp = setup.request("GET", host, cb)
        assert resp.text == f"outpost:{cb}"


#: What each proxy sends to the auth endpoint for `POST http://<host>/app/page?q=1&x=%2F`.
def expected_auth_request(setup: Setup, host: str) -> dict[str, str | None]:
    outpost = f"127.0.0.1:{setup.auth.port}"
    url = f"http://{host}{APP_PATH}"
    if setup.kind == "nginx":
        return {"method": "GET", "path": "/outpost.goauthentik.io/auth/nginx", "Host": host,
                "X-Original-URL": url, "X-Original-URI": None, "X-Forwarded-Host": host,
                "X-Forwarded-Proto": "http", "Content-Length": None}
    # Traefik and Caddy pass the client's X-Original-URL/-URI through: /auth/traefik and
    # /auth/caddy must ignore them.
    if setup.kind == "traefik":
        return {"method": "GET", "path": "/outpost.goauthentik.io/auth/traefik", "Host": outpost,
                "X-Forwarded-Host": host, "X-Forwarded-Uri": APP_PATH, "X-Forwarded-Proto": "http",
                "X-Forwarded-Method": "POST", "X-Original-URL": SPOOFED["X-Original-URL"],
                "X-Original-URI": SPOOFED["X-Original-URI"]}
    if setup.kind == "caddy":
        return {"method": "GET", "path": "/outpost.goauthentik.io/auth/caddy?q=1&x=%2F", "Host": host,
                "X-Forwarded-Host": host, "X-Forwarded-Uri": APP_PATH, "X-Forwarded-Proto": "http",
                "X-Forwarded-Method": "POST", "X-Original-URL": SPOOFED["X-Original-URL"],
                "X-Original-URI": SPOOFED["X-Original-URI"]}
    assert setup.kind == "envoy"
    return {"method": "POST", "path": "/outpost.goauthentik.io/auth/envoy" + APP_PATH, "Host": host,
            "X-Forwarded-Host": None, "X-Forwarded-Uri": None, "X-Forwarded-Proto": "http",
            "X-Forwarded-Method": None, "X-Original-URL": None, "X-Original-URI": None,
            "Content-Length": "0"}


def test_what_the_auth_endpoint_receives(setup: Setup) -> None:
    host = setup.app_hosts[-1]
    resp = setup.request("POST", host, APP_PATH,
                         {"Cookie": "ok=1; other=2", "Authorization": "Bearer client-token",
                          "User-Agent": "fact-finder/1", **SPOOFED},
                         content=b"form=body")
    assert resp.status_code == 200
    seen = setup.only_auth_request()
    actual: dict[str, str | None] = {"method": seen.method, "path": seen.path}
    expected = expected_auth_request(setup, host)
    for name in expected:
        if name not in ("method", "path"):
            actual[name] = seen.get(name)
    assert actual == expected
    assert seen.body == b""
    # the session cookie and Authorization (bearer/basic header auth) always reach the outpost
    assert seen.get("Cookie") == "ok=1; other=2"
    assert seen.get("Authorization") == "Bearer client-token"
    assert seen.get("User-Agent") == "fact-finder/1"
    # the upstream still gets the original method and body
    got = setup.only_upstream_request()
    assert (got.method, got.body) == ("POST", b"form=body")


def test_spoofed_identity_headers_reach_the_outpost_only_where_expected(setup: Setup) -> None:
    """Client copies of X-authentik-* reach the auth endpoint with nginx/Traefik/Caddy (it must
    ignore them); the Envoy config strips them before ext_authz."""
    setup.request("GET", setup.app_hosts[0], APP_PATH, {"Cookie": "ok=1", **SPOOFED})
    seen = setup.only_auth_request()
    expected = [] if setup.kind == "envoy" else ["evil"]
    assert seen.get_all("X-authentik-username") == expected


def test_alias_header_names_are_dropped(setup: Setup) -> None:
    """X_authentik_username / X.authentik.username never reach the app (CGI/WSGI/PHP backends
    would read them as X-authentik-username): nginx ignores such names (underscores_in_headers
    off, ignore_invalid_headers on), Caddy 2.11 drops them, Traefik deletes them
    (aliasHeadersStrategy: delete), Envoy drops them (headers_with_underscores_action + Lua)."""
    for alias in ("X_authentik_username", "X.authentik.username", "X_Auth_Username"):
        resp = setup.request("GET", setup.app_hosts[0], APP_PATH, {"Cookie": "ok=1", alias: "evil"})
        assert resp.status_code == 200, (alias, resp.status_code)
        got = setup.only_upstream_request()
        assert [k for k, _ in got.headers if k.lower() == alias.lower()] == [], alias
        assert got.get("X-authentik-username") == "alice"


def _raw_get(port: int, host: str, target: str, extra: str = "") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_dot_segments(setup: Setup) -> None:
    """A raw `/outpost.goauthentik.io/../secret` (not normalised by the client) is checked as
    /secret by Traefik and Envoy (normalize_path), but nginx and Caddy show the outpost (and the
    app) the RAW path while routing on the normalised one. The outpost must normalise before any
    prefix or skip_path_regex decision (spec §4.4 hazard)."""
    setup.auth.clear()
    setup.upstream.clear()
    host = setup.app_hosts[0]
    raw = _raw_get(setup.port, host, "/outpost.goauthentik.io/../secret?a=1", "Cookie: ok=1\r\n")
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    [seen] = setup.auth_requests()
    raw_path = "/outpost.goauthentik.io/../secret?a=1"
    if setup.kind == "nginx":
        assert seen.get("X-Original-URL") == f"http://{host}{raw_path}"
    elif setup.kind == "traefik":
        assert seen.get("X-Forwarded-Uri") == "/secret?a=1"
    elif setup.kind == "caddy":
        assert seen.get("X-Forwarded-Uri") == raw_path
    else:
        assert seen.path == "/outpost.goauthentik.io/auth/envoy/secret?a=1"
    upstream_path = raw_path if setup.kind in ("nginx", "caddy") else "/secret?a=1"
    assert [s.path for s in setup.upstream.seen] == [upstream_path]


# --------------------------------------------------------------------------- the helpers themselves


def test_render_fills_every_placeholder_and_rejects_missing_ones() -> None:
    values = standard_values(port=1, outpost=("outpost.test", 2), upstream=("app.internal", 3))
    for name in [*FORWARD_AUTH_CONFIGS, "traefik-static.yml"]:
        text = render(name, **values, dynamic_file="/x/dynamic.yml")
        assert "{{" not in text and "}}" not in text.replace("}}}", ""), name
    with pytest.raises(KeyError, match=r"nginx-single.conf: no value for placeholder\(s\) \{\{upstream_port\}\}"):
        render("nginx-single.conf", **{k: v for k, v in values.items() if k != "upstream_port"})


@pytest.fixture
def nginx_binary() -> str:
    return require_or_skip("nginx")


def test_start_failure_reports_the_proxy_output(nginx_binary: str, tmp_path: Path) -> None:
    broken = Nginx(f"server {{\n    listen 127.0.0.1:{free_port()};\n    bogus_directive on;\n}}\n", tmp_path)
    with pytest.raises(RuntimeError,
                       match=r'nginx exited with 1 before listening(.|\n)*unknown directive "bogus_directive"'):
        broken.start()
    assert broken.pid is None
