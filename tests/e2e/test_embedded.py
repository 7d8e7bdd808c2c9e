"""Embedded-outpost mode (seed 003): the outpost stands where authentik's embedded outpost does, in
front of the whole authentik server, and routes every request in the seed's order:

1. `/static`, `/media`, `/help` (alone or followed by `/`) -> the authentik server, on any host;
2. `/outpost.goauthentik.io/...` -> the outpost, on any host (provider looked up by host);
3. a provider's host (proxy, forward_single, forward_domain by cookie domain) -> the outpost;
4. everything else -> the authentik server.

Real processes: mitmdump with AUTHENTIK_HOST/TOKEN pointing at the authentik API double
(tests/support/authentik_api.py), which is also the authentik server behind the outpost (its
pages, files, websocket, upload and slow endpoints), `--set outpost_embedded=true`; the dev IdP;
the whoami upstream; nginx for forward auth. What the server received is read from the double's
record of every request (headers exactly as they arrived).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import connect

from mitm_outpost import names
from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from mitm_outpost.testing.transport import LoopbackTransport as HostMap
from tests.e2e.test_authentik_source import ApiOutpost, eventually, login, provider, seen
from tests.support.authentik_api import (
    ACK,
    BACKEND_FILES,
    HELLO,
    AuthentikAPIDouble,
    RecordedRequest,
    authentik_oidc_configuration,
    make_provider,
    self_signed_certificate,
)
from tests.support.processes import RUNNERS, follow_login
from tests.support.proxies import proxy_for, require_or_skip, standard_values

MB = 1 << 20
LIMIT = 32 * MB  # outpost_embedded_body_limit's default
AUTHENTIK = "authentik.example.test"  # the authentik server's own name: no provider serves it
APP = "app.example.test"  # a proxy provider
FWD = "fwd.example.test"  # a forward_single provider (behind nginx, on the nginx port)
CORP = "corp.test"  # a forward_domain provider's cookie domain (its external host is auth.corp.test)
FLOW = "/if/flow/default-authentication-flow/"  # one of the server's pages (no token needed)
SPOOFS = [
    ("X-authentik-username", "evil"), ("X-AUTHENTIK-GROUPS", "admins"), ("x-Authentik-Meta-Provider", "forged"),
    ("X_authentik_email", "evil@example.test"), ("X-authentik-jwt", "evil.evil.evil"),
    ("X-Auth-Username", "evil"), ("X-Auth-Groups", "admins"), ("X-Auth-Request-User", "evil"),  # oauth2-proxy's
    ("X-Forwarded-User", "evil"), ("X-Forwarded-Email", "evil@example.test"),
    ("X-Forwarded-Preferred-Username", "evil"), ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "7.7.7.7"), ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example.test"), ("X-Forwarded-Port", "666"),
]
CERT_HEADERS = ("SSL-Client-Cert", "X-Forwarded-TLS-Client-Cert", "X-Forwarded-Client-Cert")


# --------------------------------------------------------------------------------------------- helpers


class EmbeddedOutpost(ApiOutpost):
    """ApiOutpost with `outpost_embedded` (unless embedded=False), the JSON access log, and every flow
    saved (with its decision record) to `flows`."""

    def __init__(self, api: AuthentikAPIDouble, *, embedded: bool = True, extra: list[str] | None = None,
                 tls_port: int = 0, tool: str = "mitmdump") -> None:
        super().__init__(api, tls_port=tls_port, tool=tool)
        self.flows = self.dir / "flows.mitm"
        self.args += ["--set", "outpost_access_log=json"]
        if tool == "mitmdump":  # mitmdump's own addons; the production runner has neither
            self.args += ["--set", "flow_detail=0", "--set", f"save_stream_file={self.flows}"]
        if embedded:
            self.args += ["--set", "outpost_embedded=true"]
        self.args += extra or []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def send(self, method: str, host: str, path: str, headers: list[tuple[str, str]] | None = None,
             **kwargs: Any) -> httpx2.Response:
        """One request on a fresh connection, with Host = `host` and exactly `headers` besides."""
        with httpx2.Client(timeout=kwargs.pop("timeout", 10)) as client:
            return client.request(method, self.url(path), headers=[("Host", host), *(headers or [])], **kwargs)

    def access_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output.splitlines():
            start = line.find('{"time":')
            if start >= 0:
                try:
                    lines.append(json.loads(line[start:]))
                except ValueError:
                    pass
        return lines

    def access_line(self, path: str, host: str | None = None) -> dict[str, Any]:
        """The latest JSON access log line for `path` (and `host`), waiting a little for it."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [line for line in self.access_lines() if line["path"] == path and host in (None, line["host"])]
            return bool(found)

        eventually(check, timeout=5)
        return found[-1]

    def records(self, path: str) -> list[dict[str, Any]]:
        """The decision records of the saved flows for `path` (mitmproxy's flow file, read while it grows)."""
        from mitmproxy import io as flow_io
        from mitmproxy.exceptions import FlowReadException

        found = []
        if self.flows.exists():
            with self.flows.open("rb") as f:
                try:
                    for flow in flow_io.FlowReader(f).stream():
                        if getattr(flow, "request", None) is not None and flow.request.path.partition("?")[0] == path:
                            found.append(flow.metadata.get("outpost") or {})
                except FlowReadException:
                    pass  # the last flow is being written
        return found


def names_of(rec: RecordedRequest) -> set[str]:
    return {k.lower().replace("_", "-") for k, _ in rec.raw_headers}


def assert_no_identity(rec: RecordedRequest) -> None:
    """No identity header of any spelling (X-authentik-*, X-Auth-*, client-sent X-Forwarded-*), and no
    spoofed value, reached the authentik server."""
    identity = sorted(n for n in names_of(rec) if n.startswith(("x-authentik-", "x-auth-")) or n in (
        "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username", "x-forwarded-prefix"))
    spoofed = sorted((k, v) for k, v in rec.raw_headers
                     if any(s in v for s in ("evil", "forged", "6.6.6.6", "7.7.7.7", "666")))
    assert not identity and not spoofed, f"reached the backend: identity headers {identity}, spoofed values {spoofed}"


def assert_forwarded(rec: RecordedRequest, host: str, proto: str = "http") -> None:
    """Host is the client's; X-Forwarded-For/-Proto/-Host are the outpost's, once each."""
    assert rec.all("Host") == [host]
    assert rec.all("X-Forwarded-For") == ["127.0.0.1"], rec.raw_headers
    assert rec.all("X-Forwarded-Proto") == [proto], rec.raw_headers
    assert rec.all("X-Forwarded-Host") == [host], rec.raw_headers


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def raw_head(port: int, head: bytes, timeout: float = 3.0) -> tuple[bytes, float]:
    """Send a request head only (no body) and read what comes back within `timeout` s: (bytes, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    return data, time.monotonic() - started


def upload_head(host: str, length: int, path: str = "/upload/") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def megabytes(n: int) -> Iterator[bytes]:
    for _ in range(n):
        yield b"u" * MB


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def idp_doc(idp: str) -> dict[str, Any]:
    mock = httpx2.get(f"{idp}/.well-known/openid-configuration").json()
    return {**authentik_oidc_configuration(idp, "app", alg="RS256"), **mock, "introspection_endpoint": "",
            "token_endpoint_auth_methods_supported": ["client_secret_basic"]}


@pytest.fixture(scope="module")
def nginx_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def providers(idp_doc: dict[str, Any], upstream: str, nginx_port: int) -> list[dict[str, Any]]:
    return [
        provider(idp_doc, "app", APP, upstream),
        make_provider("fwd", f"http://{FWD}:{nginx_port}", "", "forward_single", client_id="fwd-client",
                      client_secret="fwd-secret", oidc_configuration=idp_doc),
        make_provider("corp", f"http://auth.{CORP}", "", "forward_domain", client_id="corp-client",
                      client_secret="corp-secret", oidc_configuration=idp_doc, cookie_domain=CORP),
    ]


@pytest.fixture(scope="module")
def api(providers: list[dict[str, Any]]) -> Iterator[AuthentikAPIDouble]:
    with AuthentikAPIDouble(outpost_name="authentik Embedded Outpost") as double:
        double.set_outpost(managed="goauthentik.io/outposts/embedded")
        double.set_providers(providers)
        yield double


@pytest.fixture(scope="module")
def embedded(api: AuthentikAPIDouble) -> Iterator[EmbeddedOutpost]:
    """The embedded outpost, its backend the AUTHENTIK_HOST server (outpost_embedded_backend unset)."""
    with EmbeddedOutpost(api) as outpost:
        eventually(outpost.ready)
        yield outpost


# --------------------------------------------------------------------------------------------- the double


def test_the_double_serves_as_the_authentik_backend() -> None:
    """The double's backend half, directly: files, a page, the echo websocket, slow and upload endpoints,
    and the record of headers as received (so the tests below read the backend side correctly)."""
    with AuthentikAPIDouble() as ak:
        base = f"http://127.0.0.1:{ak.port}"
        css = httpx2.get(f"{base}/static/dist/custom.css")
        assert css.status_code == 200 and css.content == BACKEND_FILES["/static/dist/custom.css"][1]
        assert css.headers["content-type"] == "text/css" and css.headers["server"].startswith("authentik-api-double")
        assert httpx2.get(f"{base}/media/public/application-icons/app.svg").status_code == 200
        assert "ak-flow-executor" in httpx2.get(f"{base}{FLOW}").text
        assert httpx2.get(f"{base}/-/health/live/").status_code == 200
        assert httpx2.get(f"{base}/api/v3/root/config/").status_code == 200  # the API is still there
        started = time.monotonic()
        with httpx2.stream("GET", f"{base}/slow/?seconds=0.4&chunks=3") as drip:
            lines = drip.iter_lines()
            assert next(lines).startswith("chunk 0") and time.monotonic() - started < 0.35
            assert [line[:7] for line in lines if line] == ["chunk 1", "chunk 2"]
        assert httpx2.get(f"{base}/slow/?seconds=0.1").json() == {"slept": 0.1}
        assert httpx2.post(f"{base}/upload/", content=b"x" * 1000).json() == {"received": 1000}
        assert httpx2.post(f"{base}/upload/", content=megabytes(3)).json() == {"received": 3 * MB}  # chunked
        assert [(u.received, u.complete) for u in ak.uploads] == [(1000, True), (3 * MB, True)]
        assert "chunked" in ak.uploads[1].headers["transfer-encoding"]
        with connect(f"ws://127.0.0.1:{ak.port}/ws/client/", open_timeout=5) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            ws.send(b"\x00\x01")
            assert ws.recv(timeout=5) == b"\x00\x01"
        ak.wait_for(lambda: ak.echo_clients[0].closed, what="echo close")
        assert ak.echo_clients[0].frames == ["hello", b"\x00\x01"] and ak.connected == 0
        httpx2.get(f"{base}{FLOW}", headers=[("X-Twice", "1"), ("x-twice", "2"), ("X_Under", "u")])
        rec = ak.last(FLOW)
        assert rec.all("x-twice") == ["1", "2"] and ("X_Under", "u") in rec.raw_headers and rec.peer[0] == "127.0.0.1"


# --------------------------------------------------------------------------------------------- routing


def test_a_provider_host_is_the_outposts_and_logs_in(embedded: EmbeddedOutpost, api: AuthentikAPIDouble) -> None:
    client = login(embedded, APP)
    headers = seen(embedded, APP, client)
    assert headers["x-authentik-username"] == "alice"
    assert headers["x-authentik-meta-outpost"] == "authentik Embedded Outpost"
    assert headers["x-authentik-meta-provider"] == "app"
    assert api.received("/headers") == []  # the upstream answered, not the authentik server
    line = embedded.access_line("/headers", APP)
    assert line["route"] == "outpost" and line["decision"] == "allowed", line
    assert embedded.records("/headers")[-1].get("route") == "outpost"


def test_a_non_provider_host_goes_to_the_backend_without_identity(embedded: EmbeddedOutpost,
                                                                  api: AuthentikAPIDouble) -> None:
    hop = [("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret-hop"), ("Keep-Alive", "timeout=5"),
           ("Proxy-Connection", "keep-alive")]
    cookie = [("Cookie", "authentik_session=django-session-1; authentik_csrf=c")]
    response = embedded.send("GET", AUTHENTIK, FLOW, SPOOFS + hop + cookie + [("Accept", "text/html")])
    assert response.status_code == 200, response.text[:300]
    assert "ak-flow-executor" in response.text  # the authentik server's page, not a login redirect
    rec = api.last(FLOW)
    assert_forwarded(rec, AUTHENTIK)
    assert not names_of(rec) & {"x-hop", "keep-alive", "proxy-connection"}, rec.raw_headers
    assert "x-hop" not in " ".join(rec.all("Connection")).lower()
    assert "authentik_session=django-session-1" in rec.headers.get("cookie", "")  # authentik's own session
    line = embedded.access_line(FLOW, AUTHENTIK)
    assert (line["route"], line["decision"], line["code"]) == ("backend", "backend", "embedded_backend"), line
    record = embedded.records(FLOW)[-1]  # the decision record itself, as the saved flow holds it
    assert (record.get("route"), record.get("outcome"), record.get("code")) == ("backend", "backend",
                                                                                "embedded_backend")
    assert_no_identity(rec)


def test_the_api_and_a_post_reach_the_backend_with_their_credentials(embedded: EmbeddedOutpost,
                                                                      api: AuthentikAPIDouble) -> None:
    """authentik's UI and API clients talk to the server through the outpost: Authorization passes."""
    response = embedded.send("GET", AUTHENTIK, "/api/v3/root/config/", [("Authorization", f"Bearer {api.token}"),
                                                                         ("Accept", "application/json")])
    assert response.status_code == 200 and "capabilities" in response.json()
    assert api.last("/api/v3/root/config/").headers["authorization"] == f"Bearer {api.token}"
    denied = embedded.send("GET", AUTHENTIK, "/api/v3/outposts/proxy/", [("Accept", "application/json")])
    assert denied.status_code == 403 and denied.json() == {"detail": "Authentication credentials were not provided."}
    posted = embedded.send("POST", AUTHENTIK, "/upload/", [("Content-Type", "application/json")], content=b'{"a": 1}')
    assert posted.json() == {"received": 8}


def test_the_outposts_paths_on_the_authentik_host_stay_the_outposts(embedded: EmbeddedOutpost,
                                                                     api: AuthentikAPIDouble) -> None:
    """No provider serves the authentik host, yet /outpost.goauthentik.io/ there is the outpost's (rule 2)."""
    for host in (AUTHENTIK, api.host):  # a name, and the AUTHENTIK_HOST address itself
        callback = embedded.send("GET", host, "/outpost.goauthentik.io/callback?code=abc&state=xyz",
                                 [("Accept", "application/json")])
        assert callback.status_code == 400, callback.text[:300]
        assert callback.json()["message"] == "no app for hostname"
        assert not callback.headers.get("server", "").startswith("authentik-api-double")
        assert embedded.send("GET", host, "/outpost.goauthentik.io/ping").status_code == 204
        start = embedded.send("GET", host, "/outpost.goauthentik.io/start?rd=/", [("Accept", "text/html")])
        assert not start.headers.get("server", "").startswith("authentik-api-double")
    for path in ("/outpost.goauthentik.io/callback", "/outpost.goauthentik.io/ping", "/outpost.goauthentik.io/start"):
        assert api.received(path) == [], path
    assert embedded.access_line("/outpost.goauthentik.io/callback", AUTHENTIK)["route"] == "outpost"


def test_static_media_help_go_to_the_backend_even_on_a_provider_host(embedded: EmbeddedOutpost,
                                                                      api: AuthentikAPIDouble) -> None:
    """Rule 1 comes before rule 3; `/static` alone counts, `/staticx` does not."""
    client = login(embedded, APP)  # a session on the provider: still no identity to the server
    for path in ("/static/dist/custom.css", "/static/dist/poly.js", "/media/public/application-icons/app.svg",
                 "/help/", "/static"):
        response = embedded.get(APP, path, client, headers={"X-authentik-username": "evil"})
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
        assert response.content == BACKEND_FILES[path][1], path
        rec = api.last(path)
        assert_no_identity(rec)
        assert_forwarded(rec, APP)
        assert embedded.access_line(path, APP)["route"] == "backend"
    anonymous = embedded.get(AUTHENTIK, "/static/dist/custom.css")  # and on any other host
    assert anonymous.status_code == 200 and api.last("/static/dist/custom.css").all("Host") == [AUTHENTIK]
    for path in ("/staticx", "/static.css", "/mediafile", "/helpme"):
        response = embedded.get(APP, path)
        assert response.status_code == 302, (path, response.status_code)  # the provider's login, not the server
        assert api.received(path) == [], path


def test_forward_auth_provider_hosts_keep_the_outpost_paths_and_give_the_rest_to_the_server(
        embedded: EmbeddedOutpost, api: AuthentikAPIDouble, nginx_port: int) -> None:
    """As authentik's embedded outpost: a forward-auth provider's host is the outpost's only under
    /outpost.goauthentik.io (its checks, callback, sign-out); its other paths are the server's, so a
    domain-level external host that is authentik's own (auth.corp.test) still serves authentik's UI."""
    for host in (f"{FWD}:{nginx_port}", f"auth.{CORP}", f"wiki.{CORP}", f"deep.wiki.{CORP}"):
        path = f"/fwd-probe-{host.split('.')[0].split(':')[0]}"
        embedded.get(host, path)
        assert api.received(path) != [] and embedded.access_line(path)["route"] == "backend", host
        ping = embedded.get(host, "/outpost.goauthentik.io/ping")
        assert ping.status_code == 204 and not api.received("/outpost.goauthentik.io/ping"), host
    start = embedded.get(f"auth.{CORP}", "/outpost.goauthentik.io/start")
    assert start.status_code == 302 and not api.received("/outpost.goauthentik.io/start")
    assert embedded.get(f"wiki.not{CORP}", "/notcorp").status_code == 403  # the double: no token
    assert api.received("/notcorp") != []  # not on a dot boundary: the server's


# --------------------------------------------------------------------------------------------- transport


def test_websockets_pass_to_the_backend(embedded: EmbeddedOutpost, api: AuthentikAPIDouble) -> None:
    """authentik's UI websocket (/ws/client/) and an outpost's (/ws/outpost/<pk>/) go through to the server."""
    sock = socket.create_connection(("127.0.0.1", embedded.port))
    with connect(f"ws://{AUTHENTIK}/ws/client/", sock=sock, open_timeout=5,
                 additional_headers={"X-authentik-username": "evil", "Cookie": "authentik_session=s1"}) as ws:
        ws.send("ping-from-the-ui")
        assert ws.recv(timeout=5) == "ping-from-the-ui"
        ws.send(b"\x01\x02\x03")
        assert ws.recv(timeout=5) == b"\x01\x02\x03"
    client = api.echo_clients[-1]
    assert client.frames == ["ping-from-the-ui", b"\x01\x02\x03"]
    assert client.headers["host"] == AUTHENTIK and client.headers.get("x-forwarded-for") == "127.0.0.1"
    assert "x-authentik-username" not in client.headers and "authentik_session=s1" in client.headers.get("cookie", "")

    hellos = len(api.hellos)
    sock = socket.create_connection(("127.0.0.1", embedded.port))
    query = urllib.parse.urlencode({"instance_uuid": str(uuid.uuid4()), "attempt": 1})
    with connect(f"ws://{AUTHENTIK}/ws/outpost/{api.outpost_pk}/?{query}", sock=sock, open_timeout=5,
                 additional_headers=api.auth_header) as ws:
        hello = {"version": "2025.10.0", "buildHash": "", "uuid": str(uuid.uuid4()), "golangVersion": "",
                 "opensslEnabled": False, "opensslVersion": "", "fipsEnabled": False, "hostname": "t"}
        ws.send(json.dumps({"instruction": HELLO, "args": hello}))
        assert json.loads(ws.recv(timeout=5)) == {"instruction": ACK, "args": {}}
    assert len(api.hellos) == hellos + 1


def test_a_slow_backend_answer_is_streamed(embedded: EmbeddedOutpost) -> None:
    started = time.monotonic()
    with httpx2.Client(timeout=10) as client, client.stream(
            "GET", embedded.url("/slow/?seconds=1.2&chunks=2"), headers={"Host": AUTHENTIK}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("chunk 0")
        first = time.monotonic() - started
        assert next(lines).startswith("chunk 1")
    assert first < 0.8, f"the first chunk took {first:.1f} s: the outpost held the answer back"
    assert embedded.send("GET", AUTHENTIK, "/slow/?seconds=1", timeout=10).json() == {"slept": 1.0}


def test_bodies_to_the_backend_are_streamed_and_limited(embedded: EmbeddedOutpost, api: AuthentikAPIDouble) -> None:
    before, recorded = len(api.uploads), len(api.received("/upload/"))
    for length in (40 * MB, LIMIT + 1):  # refused at once, from the Content-Length alone
        answer, seconds = raw_head(embedded.port, upload_head(AUTHENTIK, length))
        assert answer.startswith(b"HTTP/1.1 413"), (length, answer[:200])
        assert seconds < 2
    assert len(api.uploads) == before and len(api.received("/upload/")) == recorded  # not even the head

    assert embedded.proc is not None
    peak = _peak_rss_kib(embedded.proc.pid)
    response = embedded.send("POST", AUTHENTIK, "/upload/", [("Content-Length", str(30 * MB))], content=megabytes(30),
                             timeout=60)
    assert response.status_code == 200 and response.json() == {"received": 30 * MB}
    assert (api.uploads[-1].received, api.uploads[-1].complete) == (30 * MB, True)
    growth_mib = (_peak_rss_kib(embedded.proc.pid) - peak) / 1024
    assert growth_mib < 20, f"the outpost buffered the body: peak RSS grew {growth_mib:.0f} MiB"
    assert embedded.access_line("/upload/", AUTHENTIK)["route"] == "backend"

    # No Content-Length (chunked): refused once the limit is crossed; the server never gets it whole.
    try:
        over = embedded.send("POST", AUTHENTIK, "/upload/", content=megabytes(40), timeout=60)
    except httpx2.TransportError:
        pass  # cut off while sending
    else:
        assert over.status_code == 413, over.status_code
    time.sleep(0.5)
    uploads = [(u.received, u.complete) for u in api.uploads]
    assert not any(complete and received > LIMIT for received, complete in uploads), uploads


# --------------------------------------------------------------------------------------------- the backend down


def test_backend_down_or_starting_then_up(api: AuthentikAPIDouble) -> None:
    """outpost_embedded_backend names another server (here not yet listening, then up, then gone);
    outpost_embedded_body_limit is its own."""
    port, before = free_port(), len(api.received(FLOW))
    extra = ["--set", f"outpost_embedded_backend=http://127.0.0.1:{port}/",
             "--set", f"outpost_embedded_body_limit={MB}"]
    with EmbeddedOutpost(api, extra=extra) as outpost:
        eventually(outpost.ready)

        def assert_starting() -> None:
            as_json = outpost.send("GET", AUTHENTIK, FLOW, [("Accept", "application/json")])
            assert as_json.status_code == 503, as_json.text[:300]
            assert as_json.headers.get("retry-after") == "5"
            assert as_json.headers["content-type"].startswith("application/json")
            assert as_json.json() == {"error": "authentik starting"}
            as_html = outpost.send("GET", AUTHENTIK, FLOW, [("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")])
            assert as_html.status_code == 503 and as_html.headers.get("retry-after") == "5"
            assert as_html.headers["content-type"].startswith("text/html")
            assert "<html" in as_html.text.lower() and "Traceback" not in as_html.text
            assert str(port) not in as_html.text + as_json.text  # the operator's detail, not the client's

        assert_starting()
        assert outpost.get(APP, "/x").status_code == 302  # the outpost's own hosts do not need the server
        with AuthentikAPIDouble(port=port) as backend:
            response = outpost.send("GET", AUTHENTIK, FLOW, [("Accept", "text/html")])
            assert response.status_code == 200 and "ak-flow-executor" in response.text
            assert backend.last(FLOW).all("Host") == [AUTHENTIK]
            within = outpost.send("POST", AUTHENTIK, "/upload/", content=b"b" * (MB // 2))
            assert within.json() == {"received": MB // 2}
            answer, _ = raw_head(outpost.port, upload_head(AUTHENTIK, MB + 1))
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert len(backend.uploads) == 1
        assert_starting()  # stopped
    assert len(api.received(FLOW)) == before  # never the AUTHENTIK_HOST server: outpost_embedded_backend is


# --------------------------------------------------------------------------------------------- mTLS headers


@pytest.fixture(scope="module")
def client_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, x509.Certificate]:
    cert_pem, key_pem, _ = self_signed_certificate("client.example.test")
    folder = tmp_path_factory.mktemp("client-cert")
    (folder / "cert.pem").write_text(cert_pem)
    (folder / "key.pem").write_text(key_pem)
    return folder / "cert.pem", folder / "key.pem", x509.load_pem_x509_certificate(cert_pem.encode())


def test_mtls_headers_from_an_untrusted_peer_are_replaced(
        api: AuthentikAPIDouble, client_certificate: tuple[Path, Path, x509.Certificate]) -> None:
    """127.0.0.1 is not a trusted proxy here: its certificate headers are dropped; a certificate it
    presents on the HTTPS port is passed on as X-Forwarded-Client-Cert in Envoy's format."""
    cert_file, key_file, cert = client_certificate
    forged = [(name, "forged-cert") for name in CERT_HEADERS]
    with EmbeddedOutpost(api, tls_port=free_port(), extra=["--set", "trusted_proxies=10.9.9.9/32"]) as outpost:
        eventually(outpost.ready)
        forwarded = [(k, v) for k, v in SPOOFS if k.lower().startswith("x-forwarded-")]
        # 403: the double's answer to a request without a token (it went through)
        assert outpost.send("GET", AUTHENTIK, "/mtls-plain/", forged + forwarded).status_code == 403
        rec = api.last("/mtls-plain/")
        assert not names_of(rec) & {n.lower() for n in CERT_HEADERS}, rec.raw_headers
        assert_forwarded(rec, AUTHENTIK)

        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with httpx2.Client(verify=context, timeout=10) as plain:
            response = plain.get(f"https://127.0.0.1:{outpost.tls_port}/mtls-none/",
                                 headers=[("Host", AUTHENTIK), *forged])
        assert response.status_code == 403
        rec = api.last("/mtls-none/")
        assert not names_of(rec) & {n.lower() for n in CERT_HEADERS}, rec.raw_headers
        assert_forwarded(rec, AUTHENTIK, "https")

        context.load_cert_chain(cert_file, key_file)
        with httpx2.Client(verify=context, timeout=10) as mtls:
            response = mtls.get(f"https://127.0.0.1:{outpost.tls_port}/mtls-cert/",
                                headers=[("Host", AUTHENTIK), *forged])
        assert response.status_code == 403
        rec = api.last("/mtls-cert/")
        assert rec.all("SSL-Client-Cert") == [] and rec.all("X-Forwarded-TLS-Client-Cert") == []
        [xfcc] = rec.all("X-Forwarded-Client-Cert")
        m = re.fullmatch(r'Hash=([0-9a-f]{64});Cert="([^"\s]*)"', xfcc)
        assert m, xfcc
        der = cert.public_bytes(serialization.Encoding.DER)
        assert m.group(1) == hashlib.sha256(der).hexdigest()
        sent = x509.load_pem_x509_certificate(urllib.parse.unquote(m.group(2)).encode())
        assert sent.public_bytes(serialization.Encoding.DER) == der
        assert m.group(2).startswith("-----BEGIN%20CERTIFICATE-----%0A")  # as Envoy writes it
        assert_forwarded(rec, AUTHENTIK, "https")


def test_mtls_headers_from_a_trusted_proxy_are_kept(embedded: EmbeddedOutpost, api: AuthentikAPIDouble) -> None:
    """The default trusted_proxies (loopback): a TLS-terminating proxy in front may pass the client's certificate."""
    sent = [("SSL-Client-Cert", "proxy-cert-1"), ("X-Forwarded-TLS-Client-Cert", "proxy-cert-2"),
            ("X-Forwarded-Client-Cert", "Hash=00;Cert=\"proxy\"")]
    assert embedded.send("GET", AUTHENTIK, "/mtls-trusted/", sent).status_code == 403
    rec = api.last("/mtls-trusted/")
    for name, value in sent:
        assert rec.all(name) == [value], (name, rec.raw_headers)


# --------------------------------------------------------------------------------------------- forward auth


@pytest.fixture(scope="module")
def embedded_lean(api: AuthentikAPIDouble) -> Iterator[EmbeddedOutpost]:
    """The same embedded outpost on the production runner (its fast lane answers the checks)."""
    with EmbeddedOutpost(api, tool="lean") as outpost:
        eventually(outpost.ready)
        yield outpost


@pytest.mark.parametrize("tool", RUNNERS)
def test_forward_auth_through_nginx_at_the_embedded_outpost(request: pytest.FixtureRequest, api: AuthentikAPIDouble,
                                                            idp: str, upstream: str, nginx_port: int,
                                                            tool: str) -> None:
    """docs/forward-auth/nginx-single.conf with the embedded outpost's port as the outpost."""
    require_or_skip("nginx")
    embedded: EmbeddedOutpost = request.getfixturevalue("embedded_lean" if tool == "lean" else "embedded")
    up = urllib.parse.urlsplit(upstream)
    values = standard_values(port=nginx_port, outpost=("127.0.0.1", embedded.port), upstream=(up.hostname, up.port),
                             domain="example.test", cookie_name=names.cookie_name("fwd-client"))
    with proxy_for("nginx-single.conf", tempfile.mkdtemp(prefix="embedded-nginx-"), values):
        client = httpx2.Client(transport=HostMap({FWD}), follow_redirects=False, headers={"Accept": "text/html"},
                               timeout=15)
        url = f"http://{FWD}:{nginx_port}/headers?x=1"
        final = follow_login(client, url, idp)
        assert final.status_code == 200 and final.url == httpx2.URL(url), (final.status_code, final.text[:300])
        got = {k.lower(): v for k, v in final.json()["headers"]}
        assert got["x-authentik-username"] == "alice" and got["x-authentik-meta-provider"] == "fwd"
        assert got["x-authentik-meta-outpost"] == "authentik Embedded Outpost"
        spoofed = client.get(url, headers={"X-authentik-username": "evil"})
        assert {k.lower(): v for k, v in spoofed.json()["headers"]}["x-authentik-username"] == "alice"
        anonymous = browser().get(f"http://127.0.0.1:{nginx_port}/headers", headers={"Host": f"{FWD}:{nginx_port}"})
        assert anonymous.status_code == 302
    for path in ("/outpost.goauthentik.io/auth/nginx", "/outpost.goauthentik.io/start",
                 "/outpost.goauthentik.io/callback"):
        assert api.received(path) == [], path


# --------------------------------------------------------------------------------------------- standalone


def test_standalone_mode_is_unchanged(api: AuthentikAPIDouble) -> None:
    """outpost_embedded off (the default): an unknown host is 400, and nothing goes to the authentik server."""
    paths = (FLOW, "/static/dist/custom.css", "/api/v3/root/config/", "/ws/client/")

    def from_clients() -> int:  # requests to those paths with a client's Host (not the outpost's own API calls)
        return sum(r.headers.get("host") in (AUTHENTIK, APP) for path in paths for r in api.received(path))

    before = from_clients()
    with EmbeddedOutpost(api, embedded=False) as outpost:
        eventually(outpost.ready)
        for path in paths[:3]:
            response = outpost.send("GET", AUTHENTIK, path, [("Accept", "application/json")])
            assert response.status_code == 400, (path, response.status_code)
            assert response.json()["message"] == "no app for hostname"
        assert outpost.get(APP, "/static/dist/custom.css").status_code == 302  # a provider's path like any other
        assert outpost.access_line(FLOW, AUTHENTIK).get("route") != "backend"
    assert from_clients() == before
