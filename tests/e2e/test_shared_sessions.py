"""Two outpost replicas sharing sessions through a real redis-server."""

from __future__ import annotations

import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
import yaml

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.processes import free_port
from tests.support.processes import Outpost
from tests.support.redis_server import RedisServer

EXTERNAL = "app.example.test:8800"


class Replica(Outpost):
    def __init__(self, entry: dict[str, object], redis_url: str, http_port: int | None = None, **runner: Any) -> None:
        super().__init__([entry], http_port or free_port(), **runner)
        doc = yaml.safe_load(self.config.read_text())
        doc["outpost"]["session_store"] = redis_url
        self.config.write_text(yaml.safe_dump(doc))


@dataclass
class Cluster:
    redis: RedisServer
    replicas: tuple[Replica, Replica]

    def url(self, index: int, path_and_query: str) -> str:
        return f"http://127.0.0.1:{self.replicas[index].http_port}{path_and_query}"

    def get(self, index: int, client: httpx2.Client, path: str) -> httpx2.Response:
        return client.get(self.url(index, path), headers={"Host": EXTERNAL})

    def login(self, client: httpx2.Client, start_on: int = 0, callback_on: int = 0, user: str = "alice") -> None:
        start = self.get(start_on, client, "/outpost.goauthentik.io/start?rd=/headers")
        assert start.status_code == 302, start.text
        form = client.post(start.headers["location"], data={"sub": user})
        callback = urllib.parse.urlsplit(form.headers["location"])
        done = self.get(callback_on, client, f"{callback.path}?{callback.query}")
        assert done.status_code == 302 and done.headers["location"] == f"http://{EXTERNAL}/headers", done.text


@pytest.fixture
def cluster(idp: str, upstream: str) -> Iterator[Cluster]:
    entry = {"name": "shared", "external_host": f"http://{EXTERNAL}", "internal_host": upstream, "issuer": idp,
             "client_id": "shared", "client_secret": "shared-secret", "access_token_validity": 60}
    with RedisServer() as server:
        # survives a restart, as production Redis would
        server.args += ["--appendonly", "yes", "--appendfsync", "always"]
        server.stop()
        server.start()
        with Replica(entry, server.url) as one, Replica(entry, server.url) as two:
            yield Cluster(server, (one, two))


def test_login_on_one_replica_works_on_the_other(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client, start_on=0, callback_on=1)  # the callback lands on the other replica
    for index in (0, 1):
        response = cluster.get(index, client, "/headers")
        assert response.status_code == 200 and response.json()["path"] == "/headers"


def test_sign_out_on_one_replica_is_refused_by_the_other_within_a_second(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client)
    assert cluster.get(0, client, "/headers").status_code == 200  # warm replica 0's local cache
    cookies = dict(client.cookies)
    assert cluster.get(1, client, "/outpost.goauthentik.io/sign_out").status_code == 302
    stale = browser()
    for name, value in cookies.items():
        stale.cookies.set(name, value, domain="127.0.0.1")
    started = time.monotonic()
    while cluster.get(0, stale, "/headers").status_code == 200:
        assert time.monotonic() - started < 1.0, "replica 0 still accepts the cookie"
        time.sleep(0.02)


def test_sessions_live_in_redis_with_their_lifetime_and_stay_small(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client)
    r = cluster.redis.client()
    keys = r.keys("mo:shared:s:*")
    assert len(keys) == 1
    assert 0 < r.ttl(keys[0]) <= 61
    assert len(r.get(keys[0])) <= 2048
    assert r.hkeys(b"mo:shared:u:alice") == [keys[0]]
    assert 0 < r.ttl(b"mo:shared:u:alice") <= 61
    cookie_values = set(dict(client.cookies).values())
    assert not any(v.encode() in b"".join(r.keys("*")) for v in cookie_values)  # only hashes of cookie values


def test_an_unreadable_session_in_redis_means_signing_in_again(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client)
    r = cluster.redis.client()
    (key,) = r.keys("mo:shared:s:*")
    r.set(key, b'{"p":"shared","s":"alice","h":[[0,"alice"]]}', keepttl=True)  # an older build's format
    response = cluster.get(1, client, "/headers")  # replica 1 has not cached it
    assert response.status_code == 302 and "/outpost.goauthentik.io/start" in response.headers["location"]
    assert "is unreadable (KeyError" in cluster.replicas[1].output


def test_warm_cache_spends_no_redis_command_per_request(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client)
    assert cluster.get(0, client, "/headers").status_code == 200
    r = cluster.redis.client()
    before = r.info("commandstats")
    for _ in range(20):
        assert cluster.get(0, client, "/headers").status_code == 200
    after = r.info("commandstats")
    calls = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
    assert not {k: v for k, v in calls.items() if v and k not in ("cmdstat_ping", "cmdstat_info")}


def test_redis_down_fails_closed_and_recovers(cluster: Cluster) -> None:
    client = browser()
    cluster.login(client)
    pending = browser()
    start = cluster.get(0, pending, "/outpost.goauthentik.io/start?rd=/headers")
    form = pending.post(start.headers["location"], data={"sub": "bob"})
    cluster.redis.kill()
    time.sleep(0.3)
    fresh = browser()
    fresh.cookies = client.cookies
    time.sleep(5.5)  # past the local cache: the session must be checked in Redis
    response = cluster.get(1, client, "/headers")
    assert response.status_code == 503 and "Traceback" not in response.text
    assert httpx2.get(cluster.url(0, "/outpost.goauthentik.io/ping")).status_code == 503
    callback = urllib.parse.urlsplit(form.headers["location"])
    interrupted = cluster.get(0, pending, f"{callback.path}?{callback.query}")
    assert interrupted.status_code == 503  # the login in progress gets a clear error
    assert "session store unavailable" in cluster.replicas[1].output
    cluster.redis.start()
    deadline = time.monotonic() + 10
    while httpx2.get(cluster.url(0, "/outpost.goauthentik.io/ping")).status_code != 204:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert cluster.get(1, client, "/headers").status_code == 200  # Redis kept the session
    cluster.login(pending, user="bob")  # and a new login works


def test_sessions_expire_in_redis(idp: str, upstream: str) -> None:
    entry = {"name": "short", "external_host": f"http://{EXTERNAL}", "internal_host": upstream, "issuer": idp,
             "client_id": "short", "client_secret": "short-secret", "access_token_validity": 2}
    with RedisServer() as server, Replica(entry, server.url) as replica:
        cluster = Cluster(server, (replica, replica))
        client = browser()
        cluster.login(client)
        assert server.client().keys("mo:short:s:*")
        time.sleep(3.5)
        assert not server.client().keys("mo:short:s:*")
        assert cluster.get(0, client, "/headers").status_code == 302


def test_back_channel_logout_from_a_certified_idp_ends_the_session_on_every_replica(upstream: str) -> None:
    import re

    from tests.support.panva import PanvaOP, login, make_rsa_jwk

    ports = free_port(), free_port()  # replica one's port is the external host the IdP posts to
    external = f"127.0.0.1:{ports[0]}"
    client_meta = {"client_id": "bcl", "client_secret": "bcl-secret",
                   "token_endpoint_auth_method": "client_secret_basic",
                   "redirect_uris": [f"http://{external}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"],
                   "backchannel_logout_uri": f"http://{external}/outpost.goauthentik.io/backchannel_logout",
                   "backchannel_logout_session_required": True}
    with RedisServer() as server, PanvaOP([client_meta], {"alice": {"preferred_username": "alice"}},
                                          [make_rsa_jwk("k1")]) as op:
        entry = {"name": "bcl", "external_host": f"http://{external}", "internal_host": upstream, "issuer": op.issuer,
                 "client_id": "bcl", "client_secret": "bcl-secret"}
        with Replica(entry, server.url, ports[0]) as one, Replica(entry, server.url) as two:
            client = browser()
            start = client.get(f"http://{external}/headers")
            authorize = client.get(start.headers["location"])
            assert client.get(login(client, authorize.headers["location"], "alice")).status_code == 302
            seen = {k.lower(): v for k, v in client.get(f"http://{external}/headers").json()["headers"]}
            assert client.get(f"http://127.0.0.1:{two.http_port}/headers",
                              headers={"Host": external}).status_code == 200
            meta = httpx2.get(f"{op.issuer}/.well-known/openid-configuration").json()
            form = client.get(meta["end_session_endpoint"],
                              params={"id_token_hint": seen["x-authentik-jwt"], "client_id": "bcl"})
            xsrf = re.search(r'name="xsrf" value="([^"]+)"', form.text)
            assert xsrf, form.text[:500]
            client.post(f"{op.issuer}/session/end/confirm", data={"xsrf": xsrf.group(1), "logout": "yes"})
            deadline = time.monotonic() + 5
            while client.get(f"http://{external}/headers").status_code != 302:
                assert time.monotonic() < deadline, "the back-channel logout did not end the session"
                time.sleep(0.1)
            assert client.get(f"http://127.0.0.1:{two.http_port}/headers",
                              headers={"Host": external}).status_code == 302
            assert "back-channel logout: ended 1 session(s)" in one.output
            bad = httpx2.post(f"http://{external}/outpost.goauthentik.io/backchannel_logout",
                              data={"logout_token": "x.y.z"})
            assert bad.status_code == 400 and bad.json()["message"] == "invalid_request"


def test_a_check_the_fast_lane_must_ask_redis_about_is_answered_and_the_connection_goes_on(idp: str) -> None:
    """Replica 1 never saw the session: its lane waits for Redis's GET on the first check (the rest of the
    chain goes on as a task) while the pipelined second check waits behind it; both are answered, in order."""
    entry = {"name": "fwd", "mode": "forward_single", "external_host": f"http://{EXTERNAL}", "internal_host": "",
             "issuer": idp, "client_id": "fwd", "client_secret": "fwd-secret"}
    lean = {"tool": "lean", "extra": ("--set", "trusted_proxies=127.0.0.0/8")}
    with RedisServer() as server, Replica(entry, server.url, **lean) as one, Replica(entry, server.url, **lean) as two:
        cluster = Cluster(server, (one, two))
        client = browser()
        start = cluster.get(0, client, f"/outpost.goauthentik.io/start?rd=http://{EXTERNAL}/page")
        assert start.status_code == 302, start.text
        form = client.post(start.headers["location"], data={"sub": "alice"})
        callback = urllib.parse.urlsplit(form.headers["location"])
        assert cluster.get(0, client, f"{callback.path}?{callback.query}").status_code == 302
        cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
        check = (f"GET /outpost.goauthentik.io/auth/nginx HTTP/1.1\r\nHost: {EXTERNAL}\r\n"
                 f"X-Original-URL: http://{EXTERNAL}/page\r\nCookie: {cookie}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", two.http_port), timeout=5) as conn:
            conn.sendall(check + check)
            answers = b""
            while answers.count(b"HTTP/1.1 ") < 2 or not answers.endswith(b"\r\n\r\n"):
                chunk = conn.recv(65536)
                assert chunk, f"the connection closed after {answers!r}"
                answers += chunk
            conn.sendall(check)  # and the connection goes on, now from the local cache
            third = conn.recv(65536)
        heads = answers.split(b"HTTP/1.1 ")[1:]
        for head in (*heads, third.removeprefix(b"HTTP/1.1 ")):
            assert head.startswith(b"200 ") and b"X-authentik-username: alice\r\n" in head, head[:200]
        assert '"lane": "fast"' in two.output or '"lane":"fast"' in two.output
