"""Hostile bytes on raw sockets against the outpost, under both runners, with real parsers behind it.

The outpost is the only parser between the Internet and apps that trust its identity headers,
so what counts is what each app parsed from what the outpost let through (the recording apps
of tests/support/hostile.py), more than the status the outpost answered. Every answer must also
come within a deadline: an attacker who can hold a connection open for free is a defect too.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from websockets.sync.client import connect

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.hostile import (
    BODY_MARKER,
    H2C_SETTINGS,
    QUERY_MARKER,
    H2cApp,
    HttpServerApp,
    Recorder,
    Response,
    Seen,
    SilentApp,
    UnacceptingListener,
    UvicornApp,
    WsgiApp,
    answered_by_app,
    exchange,
    first_response,
    request,
    status_of,
)
from tests.support.processes import Outpost, provider_entry

APPS = ("http.server", "wsgiref", "uvicorn-h11", "h2c")
# Each provider gets a loopback address of its own: the browser logins need a real address per
# provider; raw requests all go to 127.0.0.1 and name the provider in Host.
ADDRESSES = {"http.server": "127.0.0.1", "wsgiref": "127.0.0.2", "uvicorn-h11": "127.0.0.3", "h2c": "127.0.0.4",
             "down": "127.0.0.5", "silent": "127.0.0.1", "unaccepting": "127.0.0.2"}
DEADLINE = 5.0  # generous for a loaded 2-core machine; a hang takes all of it
MIB = 1 << 20
UPGRADE_H2C = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", f"HTTP2-Settings: {H2C_SETTINGS}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, Recorder]]:
    started: dict[str, Recorder] = {}
    try:
        for app in (HttpServerApp, WsgiApp, UvicornApp, H2cApp):
            recorder = app()
            started[recorder.name] = recorder
        yield started
    finally:
        for recorder in started.values():
            recorder.stop()


@pytest.fixture(autouse=True)
def fresh_records(apps: dict[str, Recorder]) -> None:
    """The apps are shared by the module: each test reads only what its own requests caused."""
    for recorder in apps.values():
        recorder.seen.clear()


@pytest.fixture(scope="module", params=["lean", "mitmdump"])
def tool(request: pytest.FixtureRequest) -> str:
    return request.param


class Front:
    """A running outpost, with one provider per app (each skipping `^/public`) and the sessions
    logged in there, each once."""

    def __init__(self, outpost: Outpost, upstreams: dict[str, str]) -> None:
        self.outpost, self.port, self.upstreams = outpost, outpost.http_port, upstreams  # upstreams: host:port by app
        self.sessions: dict[tuple[str, str], str] = {}

    def host(self, app: str) -> str:
        return f"{ADDRESSES[app]}:{self.port}"

    def session(self, app: str, user: str) -> str:
        """The cookies of a real session of `user` at the provider of `app`."""
        if (app, user) not in self.sessions:
            client = browser()
            mock_login(client, f"http://{self.host(app)}/", user)
            self.sessions[app, user] = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        return self.sessions[app, user]

    def cookie(self, app: str, user: str) -> str:
        """The same as a raw header line."""
        return f"Cookie: {self.session(app, user)}"

    @property
    def pid(self) -> int:
        assert self.outpost.proc is not None
        return self.outpost.proc.pid


@contextmanager
def _started(tool: str, idp: str, upstreams: dict[str, str], extra: list[str]) -> Iterator[Front | str]:
    """An outpost with a provider per upstream (`name: host:port`), or why it did not start:
    options the product does not know yet make each test that needs them fail with that
    reason, instead of erroring the whole module."""
    port = free_port()
    providers = [provider_entry(name.replace(".", "-"), port, f"http://{address}", idp, skip_path_regex="^/public",
                                external_host=f"http://{ADDRESSES[name]}:{port}")
                 for name, address in upstreams.items()]
    outpost = Outpost(providers, port, extra=extra, tool=tool)
    try:
        outpost.start()
    except RuntimeError as e:
        lines = str(e).splitlines()
        yield f"the outpost did not start: {next((x for x in reversed(lines) if 'option' in x), lines[-1])[:300]}"
        return
    try:
        yield Front(outpost, upstreams)
    finally:
        outpost.stop()


def _running(front: Front | str) -> Front:
    if isinstance(front, str):
        pytest.fail(front)
    return front


@pytest.fixture(scope="module")
def front(tool: str, idp: str, apps: dict[str, Recorder]) -> Iterator[Front]:
    upstreams = {name: f"127.0.0.1:{apps[name].port}" for name in APPS} | {"down": f"127.0.0.1:{free_port()}"}
    with _started(tool, idp, upstreams, []) as started:
        yield _running(started)


@pytest.fixture(scope="module")
def outpost_with(tool: str, idp: str) -> Iterator[Callable[..., Front]]:
    """`outpost_with(upstreams, "name=value", ...)`: an outpost with options of its own, started
    on first use and kept for the module. One option per outpost where possible, so a limit
    the product gets wrong fails its own tests only."""
    started: dict[tuple[object, ...], Front | str] = {}
    with ExitStack() as stack:
        def get(upstreams: dict[str, str], *settings: str) -> Front:
            key = (*upstreams.items(), *settings)
            if key not in started:
                extra = [part for setting in settings for part in ("--set", setting)]
                started[key] = stack.enter_context(_started(tool, idp, upstreams, extra))
            return _running(started[key])

        yield get


@pytest.fixture(scope="module")
def limited(outpost_with: Callable[..., Front], apps: dict[str, Recorder]) -> Callable[[str], Front]:
    """`limited("outpost_max_header_count=20")`: the http.server app behind an outpost with that limit."""
    return lambda setting: outpost_with({"http.server": f"127.0.0.1:{apps['http.server'].port}"}, setting)


@pytest.fixture(scope="module")
def failing_upstreams() -> Iterator[dict[str, Recorder]]:
    silent, unaccepting = SilentApp(), UnacceptingListener()
    yield {"silent": silent, "unaccepting": unaccepting}
    silent.stop()
    unaccepting.stop()


# --------------------------------------------------------------------------- helpers


def send(port: int, raw: bytes, deadline: float = DEADLINE, **kwargs: bool) -> Response:
    """The first response to `raw` (status 0: the connection closed without one). Fails the
    test if neither an answer nor a close came within the deadline: that is a hang."""
    data, elapsed = exchange(port, raw, deadline=deadline, **kwargs)
    assert elapsed < deadline, f"neither an answer nor a close within {deadline} s (read {data[:100]!r})"
    return first_response(data) or Response(0, {}, data)


def recorded(apps: dict[str, Recorder], settle: float = 0.1) -> list[Seen]:
    """Everything the apps parsed during this test. The short wait lets a request the outpost
    forwarded after (or without) answering arrive, so "nothing recorded" means nothing."""
    time.sleep(settle)
    return [seen for recorder in apps.values() for seen in recorder.seen]


def refused_by_outpost(response: Response, status: int = 400) -> None:
    got = f"{response.status} {response.body[:80]!r}"
    assert response.status == status, f"expected {status} from the outpost, not {got}"
    assert not answered_by_app(response), f"the {status} came from the app, so the outpost forwarded the request"


def forged(seen: list[Seen], name: str, value: str) -> list[str]:
    return [f"{s.app} parsed {name}: {v!r}" for s in seen for v in s.values(name) if value in v]


def log_size(front: Front) -> int:
    return front.outpost.log.stat().st_size


def logged_since(front: Front, offset: int) -> str:
    """What the outpost logged after `offset` (a `log_size`): the shared outpost's log, less
    what earlier tests caused."""
    time.sleep(0.5)  # the lines about a request are written after its answer
    with front.outpost.log.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- the harness itself


@pytest.mark.parametrize("name", APPS)
def test_recording_app_records_what_its_parser_split(apps: dict[str, Recorder], name: str) -> None:
    """Direct, without the outpost: each app records a plain request, and the lax ones take the
    bare-CR header apart, so the tests below can see it when the outpost lets one through."""
    app = apps[name]
    plain = send(app.port, request(f"127.0.0.1:{app.port}", "/plain/%2e%2e/x?q=1", "X-Test: one"))
    assert plain.status == 200 and answered_by_app(plain)
    assert [(s.method, s.target, s.values("X-Test")) for s in app.seen] == [("GET", "/plain/%2e%2e/x?q=1", ["one"])]
    app.seen.clear()
    send(app.port, request(f"127.0.0.1:{app.port}", "/cr", b"X-Note: a\rX-authentik-groups: admins"))
    split = forged(app.seen, "X-authentik-groups", "admins")
    assert bool(split) is (name != "uvicorn-h11"), (name, app.seen)  # h11 refuses the bare CR itself


def test_h2c_app_switches_when_asked(apps: dict[str, Recorder]) -> None:
    """Direct: the h2c app answers an upgrade with 101 and records the upgraded stream, which is
    what the upgrade tests look for behind the outpost."""
    app = apps["h2c"]
    answer = send(app.port, request(f"127.0.0.1:{app.port}", "/up", *UPGRADE_H2C, close=False))
    assert answer.status == 101
    assert [s.protocol for s in app.seen] == ["http/1.1", "h2"]


def test_failing_upstreams_fail_as_intended(failing_upstreams: dict[str, Recorder]) -> None:
    """Direct: the silent upstream takes a connection and answers nothing; the unaccepting one
    never completes the handshake, so the 504 tests below time out where they mean to."""
    with socket.create_connection(("127.0.0.1", failing_upstreams["silent"].port), timeout=0.5) as sock:
        sock.sendall(request("x", "/"))
        with pytest.raises(TimeoutError):
            sock.recv(1)
    with pytest.raises(TimeoutError):
        socket.create_connection(("127.0.0.1", failing_upstreams["unaccepting"].port), timeout=0.5).close()


def test_each_app_gets_the_identity_through_the_outpost(front: Front, apps: dict[str, Recorder]) -> None:
    for name in APPS:
        answer = send(front.port, request(front.host(name), "/hello", front.cookie(name, "bob")))
        assert answer.status == 200 and answered_by_app(answer), (name, answer)
        identity = [(s.target, s.values("X-authentik-username"), s.values("X-authentik-groups"))
                    for s in apps[name].seen]
        assert identity == [("/hello", ["bob"], ["users"])], name


# --------------------------------------------------------------------------- forged header lines


@pytest.mark.parametrize("name", APPS)
@pytest.mark.parametrize("session", [True, False], ids=["bob", "no-session"])
def test_bare_cr_cannot_forge_a_header(front: Front, apps: dict[str, Recorder], name: str, session: bool) -> None:
    lines = [b"X-Note: a\rX-authentik-groups: admins", *([front.cookie(name, "bob")] if session else [])]
    answer = send(front.port, request(front.host(name), "/private" if session else "/public/x", *lines))
    assert not forged(recorded(apps), "X-authentik-groups", "admins")
    refused_by_outpost(answer)
    assert not recorded(apps, settle=0)


MALFORMED = {
    "bare LF in a value": request("{host}", "/public/x", b"X-Note: a\nX-authentik-username: admin"),
    "LF-only line ends": b"GET /public/x HTTP/1.1\nHost: {host}\nX-authentik-username: admin\nConnection: close\n\n",
    "NUL in a value": request("{host}", "/public/x", b"X-Note: a\x00b"),
    "0x01 in a value": request("{host}", "/public/x", b"X-Note: a\x01b"),
    "0x7f in a value": request("{host}", "/public/x", b"X-Note: a\x7fb"),
    "obs-fold": request("{host}", "/public/x", b"X-A: a", b" X-authentik-username: admin"),
    "NUL in the method": request("{host}", "/public/x", method=b"G\x00ET"),
    "space in the method": request("{host}", "/public/x", method=b"GE T"),
    "( in the method": request("{host}", "/public/x", method=b"GET("),
    "HTTP/9.9": request("{host}", "/public/x", version=b"HTTP/9.9"),
    "HTTP/1.2": request("{host}", "/public/x", version=b"HTTP/1.2"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_is_refused_before_any_app(front: Front, apps: dict[str, Recorder], case: str) -> None:
    answers = [send(front.port, MALFORMED[case].replace(b"{host}", front.host(name).encode())) for name in APPS]
    seen = recorded(apps)
    assert not forged(seen, "X-authentik-username", "admin")
    assert not seen, f"apps received the request: {seen}"
    for answer in answers:
        refused_by_outpost(answer)


# --------------------------------------------------------------------------- protocol switches


@pytest.mark.parametrize("upgrade", ["h2c", "websocket, h2c", "foo"])
@pytest.mark.parametrize("session", [True, False], ids=["bob", "no-session"])
def test_no_protocol_switch_but_websocket(front: Front, apps: dict[str, Recorder], upgrade: str, session: bool) -> None:
    lines = ["Connection: Upgrade, HTTP2-Settings", f"Upgrade: {upgrade}", f"HTTP2-Settings: {H2C_SETTINGS}",
             *([front.cookie("h2c", "bob")] if session else [])]
    answer = send(front.port, request(front.host("h2c"), "/private" if session else "/public/x", *lines, close=False))
    seen = recorded(apps)
    assert not [s for s in seen if s.protocol == "h2"], "the h2c app got HTTP/2 streams through the outpost"
    assert answer.status != 101, f"the outpost switched protocols for Upgrade: {upgrade}"
    assert not [s.values("Upgrade") for s in seen if s.values("Upgrade")], "the app got an Upgrade header"
    assert answer.status >= 200


def test_websocket_with_a_session_still_works(front: Front, apps: dict[str, Recorder]) -> None:
    address = front.host("uvicorn-h11")
    with connect(f"ws://{address}/socket", additional_headers={"Cookie": front.session("uvicorn-h11", "bob")},
                 open_timeout=DEADLINE) as ws:
        ws.send("hello")
        assert ws.recv(timeout=DEADLINE) == "bob:hello"
    assert [s.protocol for s in apps["uvicorn-h11"].seen] == ["websocket"]


# --------------------------------------------------------------------------- dot segments

NORMALISED = {"/admin/../public/x": "/public/x", "/admin/%2e%2e/public/x": "/public/x",
              "/admin/%2E%2E/public/x": "/public/x", "/public/../admin": "/admin", "/public/%2e%2e/admin": "/admin"}


def _outside_the_rule(seen: list[Seen]) -> list[str]:
    return [f"{s.app} got {s.target!r}" for s in seen
            if s.target.lower().startswith("/admin") or ".." in s.target or "%2e" in s.target.lower()]


@pytest.mark.parametrize("path", NORMALISED)
def test_dot_segments_never_reach_an_app(front: Front, apps: dict[str, Recorder], path: str) -> None:
    answers = {name: send(front.port, request(front.host(name), path)) for name in APPS}
    assert not _outside_the_rule(recorded(apps))
    for name, answer in answers.items():
        assert answer.status == 308, (name, answer.status)
        if answer.status == 308:
            assert urllib.parse.urlsplit(answer.headers.get("location", "")).path == NORMALISED[path], answer.headers


def test_following_the_308_reaches_only_the_normalised_path(front: Front, apps: dict[str, Recorder]) -> None:
    for name in APPS:
        answer = send(front.port, request(front.host(name), "/admin/../public/x"))
        assert not _outside_the_rule(recorded(apps))
        assert answer.status == 308, f"{name}: {answer.status}, not a 308 to the normalised path"
        location = urllib.parse.urlsplit(answer.headers["location"])
        assert location.path == "/public/x"
        assert send(front.port, request(front.host(name), location.path)).status == 200
        assert [s.target for s in apps[name].seen] == ["/public/x"]
        apps[name].seen.clear()


# --------------------------------------------------------------------------- hop-by-hop headers


@pytest.mark.parametrize("name", APPS)
def test_connection_cannot_drop_the_identity(front: Front, apps: dict[str, Recorder], name: str) -> None:
    """A next hop that honours `Connection` would strip whatever it names: identity included."""
    hop = "Connection: close, X-authentik-username, X-authentik-groups, X-Forwarded-For"
    answer = send(front.port, request(front.host(name), "/private", hop, front.cookie(name, "alice"), close=False))
    assert answer.status == 200
    (seen,) = apps[name].seen
    assert seen.values("X-authentik-username") == ["alice"]
    if name == "http.server":
        named = [v for v in seen.values("Connection") if re.search(r"authentik|forwarded", v, re.IGNORECASE)]
        assert not named, f"the app got a Connection header naming identity fields: {named}"


def test_fields_named_in_connection_are_not_forwarded(front: Front, apps: dict[str, Recorder]) -> None:
    lines = ["Connection: close, X-Custom", "X-Custom: 1", front.cookie("http.server", "alice")]
    assert send(front.port, request(front.host("http.server"), "/private", *lines, close=False)).status == 200
    (seen,) = apps["http.server"].seen
    assert not seen.values("X-Custom"), "a field the client named in Connection reached the app"


@pytest.mark.parametrize("framing", ["Content-Length", "Transfer-Encoding", "Host"])
def test_connection_cannot_strip_the_framing(front: Front, apps: dict[str, Recorder], framing: str) -> None:
    """A body whose Content-Length the outpost dropped would reach the app as a second, unjudged request."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: x\r\nX-authentik-username: admin\r\n\r\n"
    if framing == "Transfer-Encoding":
        body, length = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled), "Transfer-Encoding: chunked"
    else:
        body, length = smuggled, f"Content-Length: {len(smuggled)}"
    raw = request(front.host("http.server"), "/public/x", f"Connection: close, {framing}", length,
                  method="POST", body=body, close=False)
    send(front.port, raw)
    paths = [seen.path for seen in apps["http.server"].seen]
    assert paths in ([], ["/public/x"]), f"the app parsed a request the outpost never judged: {paths}"
    assert all(not seen.values("X-authentik-username") for seen in apps["http.server"].seen)


def test_hop_by_hop_headers_never_reach_the_app(front: Front, apps: dict[str, Recorder]) -> None:
    hop = {"Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive", "TE": "trailers", "Trailer": "X-T"}
    lines = [f"{k}: {v}" for k, v in hop.items()]
    lines.append(front.cookie("http.server", "alice"))
    assert send(front.port, request(front.host("http.server"), "/private", *lines)).status == 200
    (seen,) = apps["http.server"].seen
    assert {k: seen.values(k) for k in hop if seen.values(k)} == {}


# --------------------------------------------------------------------------- bodies the outpost answers itself


def _body(size: int, chunked: bool) -> bytes:
    line = f"logout_token={BODY_MARKER}&pad=".encode()
    body = (line + b"x" * (1022 - len(line)) + b"\r\n") * (size // 1024)
    if not chunked:
        return body
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


BODY_TARGETS = {  # target, Host (None: the provider's), statuses
    "protected path": ("/private", None, (302, 401)),
    "start": ("/outpost.goauthentik.io/start", None, (302,)),
    "unknown host": ("/private", "unknown.example", (400,)),
    "backchannel logout": ("/outpost.goauthentik.io/backchannel_logout", None, (413,)),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("target", BODY_TARGETS)
def test_20mib_body_is_answered_without_waiting_for_it(front: Front, apps: dict[str, Recorder], target: str,
                                                       chunked: bool) -> None:
    path, host, statuses = BODY_TARGETS[target]
    body = _body(20 * MIB, chunked)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    raw = request(host or front.host("http.server"), path, framing, "Content-Type: application/x-www-form-urlencoded",
                  method="POST", body=body)
    before = log_size(front)
    answer = send(front.port, raw)
    problems = [f"answered {answer.status} {answer.body[:80]!r}"] if answer.status not in statuses else []
    if BODY_MARKER in logged_since(front, before):
        problems.append("the body is in the outpost's log")
    if (growth := log_size(front) - before) >= 200 * 1024:
        problems.append(f"the outpost's log grew by {growth >> 10} KiB")
    problems += [f"{seen.app} received {seen.method} {seen.target}" for seen in recorded(apps)]
    assert not problems


def test_backchannel_logout_never_reaches_the_app(front: Front, apps: dict[str, Recorder]) -> None:
    raw = request(front.host("http.server"), "/outpost.goauthentik.io/backchannel_logout", "Transfer-Encoding: chunked",
                  "Content-Type: application/x-www-form-urlencoded", method="POST", body=_body(2 * MIB, chunked=True))
    answer = send(front.port, raw)
    assert not recorded(apps, settle=0.5), "the back-channel logout request reached an app"
    assert answer.status == 413, answer


# --------------------------------------------------------------------------- framing


def test_expect_100_continue_gets_the_final_refusal_first(front: Front) -> None:
    lines = ["Accept: application/json", "Expect: 100-continue", "Content-Length: 10"]
    answer = send(front.port, request(front.host("http.server"), "/private", *lines, method="POST", close=False))
    assert answer.status == 401, f"first status line: {answer.status} (100 means the body was invited first)"


def test_chunked_body_with_a_trailer(front: Front, apps: dict[str, Recorder]) -> None:
    lines = ["Transfer-Encoding: chunked", "Trailer: X-T", front.cookie("http.server", "alice")]
    answer = send(front.port, request(front.host("http.server"), "/upload", *lines, method="POST",
                                      body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"))
    assert answer.status == 200 and answered_by_app(answer), answer
    (seen,) = apps["http.server"].seen
    assert seen.body == b"hello"
    assert not seen.values("X-T"), "the trailer reached the app as a header"
    assert send(front.port, request(front.host("http.server"), "/public/after")).status == 200


def test_leading_empty_line_is_not_left_waiting(front: Front) -> None:
    answer = send(front.port, b"\r\n" + request(front.host("http.server"), "/public/x"), deadline=2.0)
    assert answer.status == 200, answer


BAD_CHUNKS = {"LF-only chunk lines": b"5\nhello\n0\n\n", "non-hex size": b"zz\r\nhello\r\n0\r\n\r\n",
              "huge size": b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"}


@pytest.mark.parametrize("case", BAD_CHUNKS)
def test_bad_chunk_framing_is_refused(front: Front, apps: dict[str, Recorder], case: str) -> None:
    raw = request(front.host("http.server"), "/public/upload", "Transfer-Encoding: chunked", method="POST",
                  body=BAD_CHUNKS[case])
    answer = send(front.port, raw)
    assert not [s.body for s in recorded(apps) if s.body], "an app received a body"
    assert answer.status == 0, f"not closed without an answer: {answer}"


# --------------------------------------------------------------------------- limits


def test_long_request_line_gets_414(limited: Callable[[str], Front]) -> None:
    front = limited("outpost_max_request_line=1024")
    assert send(front.port, request(front.host("http.server"), "/public/" + "a" * 2048)).status == 414


def test_large_header_block_gets_431(limited: Callable[[str], Front]) -> None:
    front = limited("outpost_max_header_size=8192")
    lines = [f"X-Pad-{i}: {'p' * 2048}" for i in range(8)]
    assert send(front.port, request(front.host("http.server"), "/public/x", *lines)).status == 431


def test_many_headers_get_431(limited: Callable[[str], Front]) -> None:
    front = limited("outpost_max_header_count=20")
    lines = [f"X-Many-{i}: {i}" for i in range(30)]
    assert send(front.port, request(front.host("http.server"), "/public/x", *lines)).status == 431


def test_unfinished_header_is_cut_off(limited: Callable[[str], Front]) -> None:
    front = limited("outpost_header_timeout=1")
    data, elapsed = exchange(front.port, b"GET / HTTP/1.1\r\nHost: x\r\n", deadline=10)
    assert elapsed < 3.5, f"a client that stopped mid-header was held {elapsed:.1f} s (header timeout 1 s)"
    assert status_of(data) in (0, 408), data[:100]


def test_many_huge_unfinished_headers_do_not_grow_memory(limited: Callable[[str], Front],
                                                         apps: dict[str, Recorder]) -> None:
    front = limited("outpost_max_header_size=8192")
    raw = request(front.host("http.server"), "/public/x", close=False)[:-2] + b"X-Big: " + b"a" * MIB
    before, log_before = _rss_kib(front.pid), log_size(front)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kib(front.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda _: exchange(front.port, raw, deadline=15), range(40)))
    finally:
        done.set()
        sampler.join()
    statuses = {status_of(data) for data, _ in results}
    slowest = max(elapsed for _, elapsed in results)
    assert statuses <= {0, 431} and slowest < 15, f"statuses {statuses}, slowest {slowest:.1f} s"
    assert (peak - before) / 1024 < 40, f"the outpost's RSS grew {(peak - before) / 1024:.0f} MB"
    assert len(logged_since(front, log_before)) < 200 * 1024, "the outpost logged the headers it refused"
    assert not recorded(apps)


# --------------------------------------------------------------------------- upstream failures


@pytest.mark.parametrize("upstream", ["silent", "unaccepting"])
def test_upstream_timeout_gives_504(outpost_with: Callable[..., Front], failing_upstreams: dict[str, Recorder],
                                    upstream: str) -> None:
    """1 s timeouts, in front of an upstream that never answers and one that never completes a
    TCP handshake."""
    upstreams = {name: f"127.0.0.1:{app.port}" for name, app in failing_upstreams.items()}
    front = outpost_with(upstreams, "outpost_upstream_connect_timeout=1", "outpost_upstream_timeout=1")
    data, elapsed = exchange(front.port, request(front.host(upstream), "/public/x"), deadline=10)
    answer = first_response(data)
    assert answer is not None and answer.status == 504, data[:200]
    assert elapsed < 3.5, f"504 after {elapsed:.1f} s with 1 s timeouts"
    assert not _names(answer.body, front.upstreams[upstream]), answer.body[:300]


def test_upstream_timeout_holds_for_every_request_of_a_keep_alive_connection(
        outpost_with: Callable[..., Front], failing_upstreams: dict[str, Recorder], apps: dict[str, Recorder]) -> None:
    """The timer is the connection's, not each request's: answered requests do not stop it from
    catching a later one that gets no answer, 1 s after that one was sent."""
    upstreams = {"silent": f"127.0.0.1:{failing_upstreams['silent'].port}", APPS[1]: f"127.0.0.1:{apps[APPS[1]].port}"}
    front = outpost_with(upstreams, "outpost_upstream_timeout=1")
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    for _ in range(3):
        time.sleep(0.3)
        conn.request("GET", "/public/x", headers={"Host": front.host(APPS[1])})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200
    started = time.monotonic()
    conn.request("GET", "/public/x", headers={"Host": front.host("silent")})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 504
    assert 0.9 < time.monotonic() - started < 3, "1 s after this request was sent, not after the connection's first"


def test_upstream_down_gives_502_without_its_address(front: Front) -> None:
    answer = send(front.port, request(front.host("down"), "/public/x"))
    assert answer.status == 502, answer
    assert not _names(answer.body, front.upstreams["down"]), answer.body[:300]


def _names(page: bytes, address: str) -> bool:
    """Whether an error page gives the upstream's address away, in any spelling: `host:port`,
    or Python's `('host', port)` that an exception message carries."""
    host, port = address.rsplit(":", 1)
    return host.encode() in page or re.search(rb"\b%s\b" % port.encode(), page) is not None


# --------------------------------------------------------------------------- logs


LOGGED_REQUESTS = {
    "query of a protected path": f"/private?token={QUERY_MARKER}",
    "refused rd": f"/outpost.goauthentik.io/start?rd=https://evil.example/?x={QUERY_MARKER}",
    "callback error": f"/outpost.goauthentik.io/callback?error=x%0D%0AFAKE-LOG-LINE&error_description={QUERY_MARKER}",
}


@pytest.mark.parametrize("case", LOGGED_REQUESTS)
def test_log_holds_no_query_and_no_injected_line(front: Front, case: str) -> None:
    before = log_size(front)
    answer = send(front.port, request(front.host("http.server"), LOGGED_REQUESTS[case]))
    assert answer.status == {"query of a protected path": 302, "refused rd": 302, "callback error": 403}[case], answer
    logged = logged_since(front, before)
    assert QUERY_MARKER not in logged, "the query string is in the outpost's log"
    injected = [line for line in logged.splitlines() if line.startswith("FAKE-LOG-LINE")]
    assert not injected, f"a client wrote a log line: {injected}"
