"""authentik's query markers end to end: `?X-authentik-auth-callback=true` and `?X-authentik-logout=true` on any path,
in proxy mode and through real reverse proxies (the original URL of a forward-auth check), with the dev IdP.

The app behind is a recorder, so that each test can say the marked requests never reached it.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest

from mitm_outpost import names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from tests.e2e.test_forward_auth import DOMAIN, Setup
from tests.e2e.test_forward_auth import browser as loopback_browser
from tests.support.processes import RUNNERS, Outpost, provider_entry
from tests.support.proxies import proxy_for, render, require_or_skip, standard_values

CONFIRM_FORM = re.compile(r'<form method="post" action="([^"]+)">')


class Recorder(ThreadingHTTPServer):
    """The app: answers every GET with the headers it received (as the demo app's /headers), and keeps the paths."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def saw(self, text: str) -> bool:
        return any(text in path for path in self.paths)


class RecorderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        body = json.dumps({"path": self.path, "headers": list(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # a confirmation's POST that got through would be recorded too (it has no body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def app() -> Iterator[Recorder]:
    server = Recorder()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def username(response: httpx2.Response) -> list[str]:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return [v for k, v in response.json()["headers"] if k.lower() == "x-authentik-username"]


def back_from_the_idp(client: httpx2.Client, response: httpx2.Response, idp: str) -> str:
    """From an answer that sends the browser to sign in, through the dev IdP's login (as alice): the URL the
    IdP sends the browser back to, not followed."""
    for _ in range(10):
        assert response.status_code == 302, (response.status_code, response.text[:300])  # the outpost's and the IdP's
        location = urllib.parse.urljoin(str(response.url), response.headers["location"])
        if not location.startswith(idp):
            if str(response.url).startswith(idp):
                return location
            response = client.get(location)  # the outpost's own /start
        elif "/oauth2/authorize" in location:
            response = client.post(location, data={"sub": "alice"})
        else:
            response = client.get(location)
    raise AssertionError("the IdP never sent the browser back")


def elsewhere(url: str, path: str) -> str:
    """The IdP's redirect back, landed on another path of the same host (the marker and the query kept)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.path == names.CALLBACK_PATH and names.CALLBACK_QUERY in parts.query
    return urllib.parse.urlunsplit(parts._replace(path=path))


def assert_sent_to_end_session(response: httpx2.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert urllib.parse.urlsplit(response.headers["location"]).path.endswith("/end_session")
    assert any("Max-Age=0" in c for c in response.headers.get_list("set-cookie"))


# --------------------------------------------------------------------------- proxy mode


@pytest.fixture(scope="module")
def outpost(idp: str, app: Recorder) -> Iterator[Outpost]:
    port = free_port()
    with Outpost([provider_entry("marks", port, app.url, idp)], port) as process:
        yield process


def signed_in(outpost: Outpost, idp: str) -> httpx2.Client:
    client = browser()
    back = back_from_the_idp(client, client.get(f"{outpost.url}/headers"), idp)
    assert client.get(back).status_code == 302
    assert username(client.get(f"{outpost.url}/headers")) == ["alice"]
    return client


def test_proxy_mode_a_callback_landing_on_any_path_signs_in(outpost: Outpost, idp: str, app: Recorder) -> None:
    client = browser()
    back = back_from_the_idp(client, client.get(f"{outpost.url}/headers?x=1"), idp)
    done = client.get(elsewhere(back, "/some/page"))
    assert done.status_code == 302 and done.headers["location"] == f"{outpost.url}/headers?x=1"
    assert username(client.get(done.headers["location"])) == ["alice"]
    assert not app.saw("/some/page") and not app.saw("code=")


def test_proxy_mode_a_logout_marker_on_any_path_signs_out(outpost: Outpost, idp: str, app: Recorder) -> None:
    client = signed_in(outpost, idp)
    assert_sent_to_end_session(client.get(f"{outpost.url}/reports/2024?X-authentik-logout=true&x=1"), 302)
    assert client.get(f"{outpost.url}/headers").status_code == 302  # back to sign in
    assert not app.saw(names.LOGOUT_MARKER)


def test_proxy_mode_a_cross_site_logout_marker_asks_and_its_form_signs_out(outpost: Outpost, idp: str,
                                                                             app: Recorder) -> None:
    client = signed_in(outpost, idp)
    page = client.get(f"{outpost.url}/reports?X-authentik-logout=TRUE", headers={"Sec-Fetch-Site": "cross-site"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    action = CONFIRM_FORM.search(page.text)
    assert action is not None and action.group(1) == f"?{names.LOGOUT_QUERY}"
    assert username(client.get(f"{outpost.url}/headers")) == ["alice"]  # nothing ended yet
    confirmed = client.post(urllib.parse.urljoin(str(page.url), action.group(1)),
                            headers={"Sec-Fetch-Site": "same-origin", "Origin": outpost.url})
    assert_sent_to_end_session(confirmed, 303)
    assert not app.saw(names.LOGOUT_MARKER)


# --------------------------------------------------------------------------- forward auth

RELAYING = ["traefik-single-no-outpost-route.yml", "Caddyfile-single", "envoy-single.yaml"]  # relay a non-2xx check
PROGRAMS = {"traefik": "traefik", "Caddyfile": "caddy", "envoy": "envoy", "nginx": "nginx"}


@contextlib.contextmanager
def running(template: str, tool: str, idp: str, app: Recorder) -> Iterator[Setup]:
    """The documented config `template` in front of the recorder, asking an outpost of its own (run by `tool`)."""
    require_or_skip(PROGRAMS[template.split("-")[0]])
    proxy_port, outpost_port = free_port(), free_port()
    entry = {"name": "marks-fwd", "client_id": "marks-fwd", "client_secret": "marks-secret", "issuer": idp,
             "mode": "forward_single", "external_host": f"http://app.{DOMAIN}:{proxy_port}"}
    values = standard_values(port=proxy_port, outpost=("127.0.0.1", outpost_port),
                             upstream=("127.0.0.1", app.server_address[1]), domain=DOMAIN,
                             cookie_name=names.cookie_name("marks-fwd"))
    with Outpost([entry], outpost_port, tool=tool) as outpost:
        with proxy_for(template, tempfile.mkdtemp(prefix="marks-"), values) as proxy:
            yield Setup(template, "single", proxy, outpost, idp)


@pytest.fixture(scope="module", params=[(t, tool) for t in RELAYING for tool in RUNNERS],
                ids=[f"{t}-{tool}" for t in RELAYING for tool in RUNNERS])
def relayed(request: pytest.FixtureRequest, idp: str, app: Recorder) -> Iterator[Setup]:
    template, tool = request.param
    with running(template, tool, idp, app) as setup:
        yield setup


@pytest.fixture(scope="module", params=RUNNERS, ids=[f"nginx-single.conf-{tool}" for tool in RUNNERS])
def nginx(request: pytest.FixtureRequest, idp: str, app: Recorder) -> Iterator[Setup]:
    with running("nginx-single.conf", request.param, idp, app) as setup:
        yield setup


def signed_in_through(setup: Setup) -> httpx2.Client:
    client = loopback_browser()
    back = back_from_the_idp(client, client.get(setup.url("app", "/headers")), setup.idp)
    assert client.get(back).status_code == 302
    assert username(client.get(setup.url("app", "/headers"))) == ["alice"]
    return client


def test_the_documented_traefik_file_without_an_outpost_route() -> None:
    """traefik-single.yml with only its outpost router (and service) left out; every placeholder filled."""
    values = standard_values(port=1, outpost=("o", 2), upstream=("u", 3))
    variant, documented = render(RELAYING[0], **values), render("traefik-single.yml", **values)
    assert "{{" not in variant and "/outpost.goauthentik.io/auth/traefik" in variant
    assert "PathPrefix(`/outpost.goauthentik.io/`)" in documented and "PathPrefix" not in variant


def test_login_round_trip_goes_through_the_check_without_a_loop(relayed: Setup, app: Recorder) -> None:
    """Without a route to the outpost (the Traefik variant), the IdP's redirect back is checked like any URL."""
    client = loopback_browser()
    back = back_from_the_idp(client, client.get(relayed.url("app", "/headers?from=login")), relayed.idp)
    done = client.get(back)  # a loop would send the browser to the IdP again here
    assert done.status_code == 302 and done.headers["location"] == relayed.url("app", "/headers?from=login")
    assert username(client.get(done.headers["location"])) == ["alice"]
    assert not app.saw(names.CALLBACK_PATH) and not app.saw("code=")


def test_a_callback_landing_on_any_app_path_signs_in(relayed: Setup, app: Recorder) -> None:
    client = loopback_browser()
    back = back_from_the_idp(client, client.get(relayed.url("app", "/headers?from=elsewhere")), relayed.idp)
    done = client.get(elsewhere(back, "/some/page"))
    assert done.status_code == 302 and done.headers["location"] == relayed.url("app", "/headers?from=elsewhere")
    assert username(client.get(done.headers["location"])) == ["alice"]
    assert not app.saw("/some/page")


def test_a_failed_marked_callback_is_answered_not_passed_to_the_app(relayed: Setup, app: Recorder) -> None:
    forged = relayed.url("app", "/some/other?X-authentik-auth-callback=true&code=c&state=forged")
    response = loopback_browser().get(forged)
    assert response.status_code == 400 and "Sign-in failed" in response.text
    assert not app.saw("/some/other")


def test_a_logout_marker_signs_out(relayed: Setup, app: Recorder) -> None:
    """A browser's own navigation (Sec-Fetch-Site: same-origin) signs out at once where the proxy passes that header
    (Traefik, Caddy); Envoy passes it to no check, so Envoy asks, and the confirmation's POST signs out."""
    client = signed_in_through(relayed)
    url = relayed.url("app", "/headers/any?X-authentik-logout=true")
    response = client.get(url, headers={"Sec-Fetch-Site": "same-origin", "Referer": relayed.url("app", "/headers")})
    if relayed.template.startswith("envoy"):
        assert response.status_code == 403 and "Sign out?" in response.text
        action = CONFIRM_FORM.search(response.text)
        assert action is not None
        response = client.post(urllib.parse.urljoin(url, action.group(1)), headers={"Origin": relayed.url("app", "")})
        assert_sent_to_end_session(response, 303)
    else:
        assert_sent_to_end_session(response, 302)
    assert client.get(relayed.url("app", "/headers")).status_code == 302  # signed out: back to sign in
    assert not app.saw(names.LOGOUT_MARKER)


def test_a_cross_site_logout_marker_asks_first(relayed: Setup, app: Recorder) -> None:
    client = signed_in_through(relayed)
    url = relayed.url("app", "/headers?X-authentik-logout=true")
    page = client.get(url, headers={"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/"})
    assert page.status_code == 403 and "Sign out?" in page.text  # a 2xx would let the request through to the app
    assert not any("Max-Age=0" in c for c in page.headers.get_list("set-cookie"))
    envoy = relayed.template.startswith("envoy")
    assert ("frame-ancestors 'none'" in page.headers.get("content-security-policy", "")) is not envoy  # Envoy drops it
    assert username(client.get(relayed.url("app", "/headers"))) == ["alice"]
    action = CONFIRM_FORM.search(page.text)
    assert action is not None
    confirmed = client.post(urllib.parse.urljoin(url, action.group(1)),
                            headers={"Sec-Fetch-Site": "same-origin", "Origin": relayed.url("app", "")})
    assert_sent_to_end_session(confirmed, 303 if envoy else 302)
    assert not app.saw(names.LOGOUT_MARKER)


def test_nginx_refuses_marked_urls_without_a_loop(nginx: Setup, app: Recorder) -> None:
    """auth_request cannot relay the redirect: 403, nothing done, nothing passed to the app, no sign-in loop."""
    client = signed_in_through(nginx)
    for query in ("X-authentik-logout=true", "X-authentik-auth-callback=true&code=c&state=s"):
        response = client.get(nginx.url("app", f"/headers/marked?{query}"))
        assert response.status_code == 403, (query, response.status_code, response.headers)
    assert username(client.get(nginx.url("app", "/headers"))) == ["alice"]
    assert not app.saw("/headers/marked")
    # nginx sends the outpost's own paths to it: a marker there is answered by the outpost itself
    own_path = nginx.url("app", f"/outpost.goauthentik.io/sign_out?{names.LOGOUT_QUERY}")
    assert_sent_to_end_session(client.get(own_path), 302)
