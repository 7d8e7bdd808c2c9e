"""The production runner's fast lane: forward-auth checks and the outpost's endpoints answered
without mitmproxy's layers give the same answers as under mitmdump, keep-alive connections move
to mitmproxy when a request must be proxied, and the edge's rules hold on the lane as well."""

from __future__ import annotations

import bz2
import http.client
import json
import random
import re
import socket
import time
from collections.abc import Iterator

import pytest

from mitm_outpost.testing.processes import free_port
from tests.support.hostile import exchange
from tests.support.processes import RUNNERS, Outpost, provider_entry

CHECK = "/outpost.goauthentik.io/auth/nginx"
APP_HOST = "app.example.test"
FORWARD_HOST = "fwd.example.test"


@pytest.fixture(scope="module")
def outposts(idp: str, upstream: str) -> Iterator[dict[str, Outpost]]:
    """One outpost per runner, each with a forward-auth provider and a proxy-mode one (skipping
    `^/public`), and a short head timeout."""
    started: dict[str, Outpost] = {}
    try:
        for tool in RUNNERS:
            port = free_port()
            providers = [
                {"name": "fwd", "mode": "forward_single", "external_host": f"http://{FORWARD_HOST}", "issuer": idp,
                 "client_id": "fwd-client", "client_secret": "fwd-secret", "skip_path_regex": "^/public"},
                provider_entry("app", port, upstream, idp, external_host=f"http://{APP_HOST}:{port}",
                               skip_path_regex="^/(public|upload)"),
            ]
            outpost = Outpost(providers, port, tool=tool, extra=["--set", "outpost_header_timeout=1",
                                                                "--set", "trusted_proxies=127.0.0.0/8"])
            outpost.start()
            started[tool] = outpost
        yield started
    finally:
        for outpost in started.values():
            outpost.stop()


def _check(url: str, *extra: str, method: str = "GET", path: str = CHECK) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: outpost.internal", f"X-Original-URL: {url}",
                        "Accept: text/html", *extra, "Connection: close", "", ""]).encode()


# Requests the outpost answers itself, as a reverse proxy (or a client) sends them; the fast lane
# must give each the answer mitmdump gives.
SAME_ANSWERS = {
    "nginx check without a session": _check(f"http://{FORWARD_HOST}/x?q=1"),
    "nginx check on a skipped path": _check(f"http://{FORWARD_HOST}/public/x"),
    "HEAD check": _check(f"http://{FORWARD_HOST}/x", method="HEAD"),
    "check for an unknown host": _check("http://nobody.example.test/x"),
    "check with a forged identity header": _check(f"http://{FORWARD_HOST}/x", "X-authentik-username: admin"),
    "check with a bogus session cookie": _check(f"http://{FORWARD_HOST}/x", "Cookie: authentik_proxy_00000000=nope"),
    "check with a small body": _check(f"http://{FORWARD_HOST}/x", "Content-Length: 5", method="POST") + b"hello",
    "check with Expect": _check(f"http://{FORWARD_HOST}/x", "Content-Length: 5", "Expect: 100-continue", method="POST"),
    "check with a chunked body": _check(f"http://{FORWARD_HOST}/x", "Transfer-Encoding: chunked", method="POST")
    + b"5\r\nhello\r\n0\r\n\r\n",
    "legacy /akprox/auth?nginx": _check(f"http://{FORWARD_HOST}/x", path="/akprox/auth?nginx"),
    "legacy /akprox/auth%3Fnginx": _check(f"http://{FORWARD_HOST}/x", path="/akprox/auth%3Fnginx"),
    "traefik check": b"GET /outpost.goauthentik.io/auth/traefik HTTP/1.1\r\nHost: outpost.internal\r\n"
    b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: fwd.example.test\r\nX-Forwarded-Uri: /x\r\n"
    b"Accept: text/html\r\nConnection: close\r\n\r\n",
    "envoy check": b"GET /outpost.goauthentik.io/auth/envoy/x HTTP/1.1\r\nHost: fwd.example.test\r\n"
    b"Accept: text/html\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n",
    "ping": b"GET /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: any\r\nConnection: close\r\n\r\n",
    "start on the forward-auth host": b"GET /outpost.goauthentik.io/start?rd=http://fwd.example.test/x HTTP/1.1\r\n"
    b"Host: fwd.example.test\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    "callback without a login": b"GET /outpost.goauthentik.io/callback?code=c&state=s HTTP/1.1\r\n"
    b"Host: fwd.example.test\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    "sign_out without a session": b"GET /outpost.goauthentik.io/sign_out HTTP/1.1\r\nHost: fwd.example.test\r\n"
    b"Accept: text/html\r\nConnection: close\r\n\r\n",
    "backchannel logout with a bad token": b"POST /outpost.goauthentik.io/backchannel_logout HTTP/1.1\r\n"
    b"Host: fwd.example.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 18\r\n"
    b"Connection: close\r\n\r\nlogout_token=bogus",
    "backchannel logout with a Content-Encoding": b"POST /outpost.goauthentik.io/backchannel_logout HTTP/1.1\r\n"
    b"Host: fwd.example.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Encoding: bz2\r\n"
    b"Content-Length: " + str(len(bz2.compress(b"a" * 1_000_000))).encode() + b"\r\nConnection: close\r\n\r\n"
    + bz2.compress(b"a" * 1_000_000),
    "CONNECT to a lane path": b"CONNECT /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "check for a WebSocket request": _check(f"http://{FORWARD_HOST}/ws", "Connection: Upgrade", "Upgrade: websocket"),
    # The edge's rules, on a lane path
    "bare CR in a header value": _check(f"http://{FORWARD_HOST}/x", "X-Note: a\rX-authentik-groups: admins"),
    "NUL in a header value": _check(f"http://{FORWARD_HOST}/x", "X-Note: a\x00b"),
    "obs-fold": _check(f"http://{FORWARD_HOST}/x", "X-Note: a", " folded"),
    "space before the colon": _check(f"http://{FORWARD_HOST}/x", "X-Note : a"),
    "two Content-Lengths": _check(f"http://{FORWARD_HOST}/x", "Content-Length: 1", "Content-Length: 2", method="POST")
    + b"ab",
    "HTTP/1.2": _check(f"http://{FORWARD_HOST}/x").replace(b"HTTP/1.1", b"HTTP/1.2", 1),
    "LF-only lines": _check(f"http://{FORWARD_HOST}/x").replace(b"\r\n", b"\n"),
    "request line too long": _check(f"http://{FORWARD_HOST}/x", path=CHECK + "?" + "a" * 9000),
    "too many fields": _check(f"http://{FORWARD_HOST}/x", *(f"X-F{i}: v" for i in range(120))),
}
VOLATILE = re.compile(rb"^(date|set-cookie|location|content-length|x-authentik-meta-version):.*$", re.I | re.M)


def _answer(raw: bytes) -> tuple[int, list[str], bytes, bytes]:
    """Status, header names and the parts of the answer that do not change between processes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    names = sorted(line.split(b":", 1)[0].decode().lower() for line in lines[1:] if line)
    location = next((line.split(b":", 1)[1].strip() for line in lines[1:] if line.lower().startswith(b"location:")),
                    b"")
    stable_location = location.split(b"?", 1)[0]  # state, nonce and PKCE differ per request
    stable_body = re.sub(rb"[\w-]{20,}", b"<token>", body)
    return status, names, stable_location, stable_body


@pytest.mark.parametrize("name", list(SAME_ANSWERS))
def test_the_fast_lane_answers_as_mitmdump_does(outposts: dict[str, Outpost], name: str) -> None:
    raw = SAME_ANSWERS[name]
    answers = {tool: _answer(exchange(o.http_port, raw)[0]) for tool, o in outposts.items()}
    assert answers["lean"] == answers["mitmdump"], f"{name}: {answers}"
    assert answers["lean"][0] != 500, name


def _access_log(outpost: Outpost, path: str) -> list[dict[str, object]]:
    lines = [json.loads(line[line.index("{"):]) for line in outpost.output.splitlines()
             if "mitm_outpost.access" in line]
    return [line for line in lines if line["path"] == path]


def test_checks_are_served_by_the_fast_lane(outposts: dict[str, Outpost]) -> None:
    lean = outposts["lean"]
    before = len(_access_log(lean, CHECK))
    exchange(lean.http_port, _check(f"http://{FORWARD_HOST}/x"))
    deadline = time.monotonic() + 5
    while len(lines := _access_log(lean, CHECK)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines[before:] and lines[-1]["lane"] == "fast", lines[before:]


def test_a_connection_carries_a_check_then_a_proxied_request_then_a_check(outposts: dict[str, Outpost]) -> None:
    port = outposts["lean"].http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    check_headers = {"Host": "outpost.internal", "X-Original-URL": f"http://{FORWARD_HOST}/x", "Accept": "text/html"}
    conn.request("GET", CHECK, headers=check_headers)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    conn.request("GET", "/public/hello", headers={"Host": f"{APP_HOST}:{port}"})
    proxied = conn.getresponse()
    body = proxied.read()
    conn.request("GET", CHECK, headers=check_headers)
    last = conn.getresponse()
    last.read()
    assert conn.sock is sock, "the connection was kept open throughout"
    assert (first.status, last.status) == (401, 401)
    assert proxied.status == 200 and b"who am I" in body, body[:200]  # the upstream's page
    lines = _access_log(outposts["lean"], "/public/hello")
    assert lines and "lane" not in lines[-1], "the proxied request went through mitmproxy"


def test_pipelined_checks_are_answered_in_order(outposts: dict[str, Outpost]) -> None:
    port = outposts["lean"].http_port
    keep = lambda path: _check(f"http://{FORWARD_HOST}{path}").replace(b"Connection: close\r\n", b"")  # noqa: E731
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(keep("/a") + keep("/public/b") + keep("/c"))
        statuses = _read_answers(sock, 3)
    assert statuses == [401, 200, 401]


def _read_answers(sock: socket.socket, count: int) -> list[int]:
    """The statuses of `count` answers with a Content-Length each, read off one connection."""
    buf, statuses = b"", []
    while len(statuses) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end]
            length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            if len(buf) >= end + 4 + length:
                statuses.append(int(head.split(b" ")[1]))
                buf = buf[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {statuses}"
        buf += chunk
    return statuses


def test_a_head_in_pieces_is_cut_off_on_the_lane(outposts: dict[str, Outpost]) -> None:
    port = outposts["lean"].http_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {CHECK} HTTP/1.1\r\nHost: outpost.internal\r\n".encode())
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert time.monotonic() - started < 4, "outpost_header_timeout=1: the sweep runs every second"


def test_a_thousand_pipelined_requests_are_answered_in_order(outposts: dict[str, Outpost]) -> None:
    """Answered one after the other off one buffer, never by recursion (a deep pipeline would
    otherwise end the connection with an error instead of answers)."""
    port = outposts["lean"].http_port
    ping = b"GET /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: a\r\n\r\n"
    before = outposts["lean"].output
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(ping * 1000)
        assert _read_answers(sock, 1000) == [204] * 1000
    assert "Traceback" not in outposts["lean"].output[len(before):]


def test_a_client_that_does_not_read_gets_no_more_answers_queued(outposts: dict[str, Outpost]) -> None:
    """Answers wait for the client to read (the transport's flow control), rather than pile up in
    the outpost's memory; once it reads, every one arrives."""
    port = outposts["lean"].http_port
    ping = b"GET /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(20):
            sock.sendall(ping * 50)
            time.sleep(0.01)
        assert _read_answers(sock, 1000) == [204] * 1000


def test_a_client_that_half_closes_after_its_request_gets_the_answer_and_the_close(
        outposts: dict[str, Outpost]) -> None:
    port = outposts["lean"].http_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /outpost.goauthentik.io/ping HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 204")
    assert time.monotonic() - started < 3, "closed once answered, not left for the idle sweep"


def test_bodies_the_outpost_reads_are_never_decompressed(outposts: dict[str, Outpost]) -> None:
    """169 bytes of bz2 would be hundreds of MB once mitmproxy decoded them."""
    for outpost in outposts.values():
        answer = exchange(outpost.http_port, SAME_ANSWERS["backchannel logout with a Content-Encoding"])[0]
        assert answer.startswith(b"HTTP/1.1 415"), answer[:200]


def test_connect_and_upgrades_on_lane_paths_are_answered_and_the_lane_goes_on(outposts: dict[str, Outpost]) -> None:
    lean = outposts["lean"]
    before = lean.output
    for name in ("CONNECT to a lane path", "check for a WebSocket request"):
        data, elapsed = exchange(lean.http_port, SAME_ANSWERS[name])
        assert data.startswith(b"HTTP/1.1 4") and elapsed < 3, (name, data[:100])
    assert exchange(lean.http_port, SAME_ANSWERS["ping"])[0].startswith(b"HTTP/1.1 204")
    assert "Traceback" not in lean.output[len(before):] and "Unhandled" not in lean.output[len(before):]


def test_an_upload_behind_a_check_on_one_connection_reaches_the_app(outposts: dict[str, Outpost]) -> None:
    """The upload's bytes arrive while the connection waits for the lane's turn: they are the
    next request's body, not a pipeline to refuse."""
    port = outposts["lean"].http_port
    body = b"x" * (1 << 20)
    check = _check(f"http://{FORWARD_HOST}/x").replace(b"Connection: close\r\n", b"")
    upload = (f"POST /upload HTTP/1.1\r\nHost: {APP_HOST}:{port}\r\nContent-Length: {len(body)}\r\n"
              "Connection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(check + upload)
        assert _read_answers(sock, 2) == [401, 200]


def _mutations(seed: int, count: int) -> list[bytes]:
    """Checks with one hostile change each, drawn from a fixed seed: the bytes an attacker would try
    on a lane path (controls, odd separators, duplicated framing, odd versions, bodies)."""
    rng = random.Random(seed)
    base = [f"GET {CHECK} HTTP/1.1", "Host: outpost.internal", f"X-Original-URL: http://{FORWARD_HOST}/x",
            "Accept: text/html"]
    pieces = ["\x00", "\r", "\n", "\t", " ", "\x7f", "\x1b", "\xff", ":", ";", ",", "\\", "%00", "%0d%0a", "..", "//"]
    extra = ["Content-Length: 3", "Content-Length: 03", "Content-Length: -1", "Content-Length: 1, 1",
             "Transfer-Encoding: chunked", "Transfer-Encoding: gzip", "Expect: 100-continue", "Connection: Upgrade",
             "Upgrade: h2c", "Host: second", "X-Forwarded-Host: evil.example", "Cookie: authentik_proxy_x=y"]
    cases = []
    for _ in range(count):
        lines = list(base)
        kind = rng.randrange(4)
        if kind == 0:  # a byte inserted somewhere in a line
            i = rng.randrange(len(lines))
            at = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:at] + rng.choice(pieces) + lines[i][at:]
        elif kind == 1:  # an extra field
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(extra))
        elif kind == 2:  # the version or the method
            lines[0] = lines[0].replace("HTTP/1.1", rng.choice(["HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "http/1.1",
                                                                "HTTP/1.1 "]))
            lines[0] = lines[0].replace("GET", rng.choice(["GET", "POST", "HEAD", "OPTIONS", "G\x00T", "get"]), 1)
        else:  # the target
            lines[0] = lines[0].replace(CHECK, rng.choice([CHECK + "?x=\x01", CHECK + "#f", "/akprox/auth?nginx",
                                                           "/akprox/auth%3Fnginx", CHECK.upper(), CHECK + "/", "*"]))
        raw = "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")
        if any("Content-Length: 3" in line for line in lines):
            raw += b"abc"
        cases.append(raw)
    return cases


FUZZ = _mutations(20261202, 150)


@pytest.mark.parametrize("case", range(len(FUZZ)))
def test_hostile_checks_get_the_same_answer_from_both_runners(outposts: dict[str, Outpost], case: int) -> None:
    answers = {}
    for tool, outpost in outposts.items():
        data, elapsed = exchange(outpost.http_port, FUZZ[case], deadline=5)
        assert elapsed < 5, f"{tool}: no answer and no close for {FUZZ[case]!r}"
        answers[tool] = _answer(data)[:2] if data else (0, [])
    assert answers["lean"] == answers["mitmdump"], (FUZZ[case], answers)
    assert answers["lean"][0] != 500
