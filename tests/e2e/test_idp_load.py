"""The IdP under load from the outpost's side: header-auth floods against panva's oidc-provider, whose
calls are counted by a relay in front of it, and a /start flood that must not stall the event loop.

The bounds are generous on purpose: they fail when a limit is missing or the loop is blocked, not
when a machine is slow. Timings belong in benchmarks; the tests print what they saw."""

from __future__ import annotations

import base64
import http.client
import statistics
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import httpx2
import pytest

from mitm_outpost.testing.login import browser
from mitm_outpost.testing.login import sign_in_to_callback as mock_login
from mitm_outpost.testing.processes import free_port
from tests.support.panva import PanvaOP, code_flow_tokens, make_rsa_jwk
from tests.support.processes import Outpost, provider_entry
from tests.support.quiet_http import InThread, QuietHandler

ACCOUNTS = {"alice": {"email": "alice@example.test", "name": "Alice", "preferred_username": "alice"}}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
BURST, RATE = 5, 1  # the defaults of header_auth_client_burst and header_auth_client_rate
TLS = httpx2.create_ssl_context()  # one for all the test's clients (each would load the CA bundle again)


class CountingRelay(InThread):
    """A reverse proxy in front of the IdP: what it relays is what the IdP was asked."""

    def __init__(self, target: str) -> None:
        target_url = urllib.parse.urlsplit(target)
        self.calls: Counter[str] = Counter()
        lock = threading.Lock()
        relay = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay()

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    relay.calls[self.path.partition("?")[0]] += 1
                upstream = http.client.HTTPConnection(target_url.hostname, target_url.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                kept = [(name, value) for name, value in answer.getheaders()
                        if name.lower() not in HOP_BY_HOP]
                self.reply(answer.status, data, content_type=None, headers=kept)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def total(self) -> int:
        return sum(self.calls.values())


@dataclass
class World:
    op: PanvaOP
    relay: CountingRelay
    outpost: Outpost
    callback: str

    def valid_bearer(self) -> str:
        return f"Bearer {code_flow_tokens(self.op, 'load-a', 'secret-a', self.callback, 'alice')['access_token']}"

    def client(self, address: str = "127.0.0.1") -> httpx2.Client:
        """A client from one loopback address: the outpost limits each address on its own."""
        return httpx2.Client(transport=httpx2.HTTPTransport(local_address=address, verify=TLS), timeout=15)

    def get(self, client: httpx2.Client, authorization: str) -> httpx2.Response:
        headers = {"Authorization": authorization, "Accept": "application/json"}
        return client.get(f"{self.outpost.url}/headers", headers=headers)


@pytest.fixture(scope="module")
def world(upstream: str) -> Iterator[World]:
    port = free_port()
    callback = f"http://127.0.0.1:{port}/outpost.goauthentik.io/callback?X-authentik-auth-callback=true"
    clients = [{"client_id": "load-a", "client_secret": "secret-a", "redirect_uris": [callback],
                "token_endpoint_auth_method": "client_secret_basic"}]
    with PanvaOP(clients, ACCOUNTS, [make_rsa_jwk("k1")]) as op, CountingRelay(op.issuer) as relay:
        meta = httpx2.get(f"{op.issuer}/.well-known/openid-configuration").json()
        through = {key: meta[key].replace(op.issuer, relay.url) for key in
                   ("token_endpoint", "introspection_endpoint", "userinfo_endpoint", "jwks_uri")}
        entry = provider_entry("load", port, upstream, op.issuer, client_id="load-a", client_secret="secret-a",
                               authorization_endpoint=meta["authorization_endpoint"], **through)
        with Outpost([entry], port) as outpost:
            yield World(op, relay, outpost, callback)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_header_auth_flood_barely_reaches_the_idp(world: World) -> None:
    good = world.valid_bearer()
    with world.client() as client:
        assert world.get(client, good).status_code == 200  # introspection (and userinfo) once, then remembered
    before = world.relay.total()

    # 200 times the same wrong app password, 20 at a time: one grant at the IdP, the rest remembered.
    bogus = basic("svc", "wrong-app-password")
    with ThreadPoolExecutor(20) as pool, world.client() as client:
        same = list(pool.map(lambda _: world.get(client, bogus).status_code, range(200)))
    assert set(same) == {401}, Counter(same)
    assert world.relay.total() - before <= 2, world.relay.calls

    # 50 different wrong passwords from one client: its burst reaches the IdP, then 429 with Retry-After.
    before, started = world.relay.total(), time.monotonic()
    with world.client() as client:
        answers = [world.get(client, basic("svc", f"guess-{n}")) for n in range(50)]
    elapsed = time.monotonic() - started
    statuses = Counter(a.status_code for a in answers)
    asked = world.relay.total() - before
    print(f"\n50 guesses in {elapsed:.2f} s: {dict(statuses)}, IdP asked {asked} times")
    assert set(statuses) <= {401, 429} and asked <= BURST + RATE * (elapsed + 1), (statuses, world.relay.calls)
    assert statuses[429] >= 50 - (BURST + RATE * (elapsed + 1))
    limited = [a for a in answers if a.status_code == 429]
    assert all(a.headers["Retry-After"].isdigit() and int(a.headers["Retry-After"]) >= 1 for a in limited)

    # Meanwhile a valid token works: the one remembered, from the limited client; a new one from another.
    with world.client() as client:
        assert world.get(client, good).status_code == 200
    with world.client("127.0.0.2") as other:
        response = world.get(other, world.valid_bearer())
        assert response.status_code == 200
        assert {k.lower(): v for k, v in response.json()["headers"]}["x-authentik-username"] == "alice"


def test_many_clients_cannot_push_the_idp_past_its_budget(world: World) -> None:
    time.sleep(1.0)
    before, started = world.relay.total(), time.monotonic()

    def guess(n: int) -> int:
        with world.client(f"127.0.1.{n}") as client:
            return world.get(client, f"Bearer not-a-token-{n}").status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = Counter(pool.map(guess, range(1, 201)))
    elapsed = time.monotonic() - started
    asked = world.relay.total() - before
    print(f"\n200 clients in {elapsed:.2f} s: {dict(statuses)}, IdP asked {asked} times")
    budget = 20  # header_auth_idp_rate's default: calls per second and provider (and the burst)
    assert set(statuses) <= {401, 429} and statuses[429] > 0
    assert asked <= budget + budget * (elapsed + 1), world.relay.calls


def test_the_loop_answers_while_start_is_flooded(idp: str, upstream: str) -> None:
    port = free_port()
    with Outpost([provider_entry("flood", port, upstream, idp)], port) as outpost:
        user = browser()
        assert mock_login(user, f"{outpost.url}/headers").status_code == 302
        assert user.get(f"{outpost.url}/headers").status_code == 200
        stop = threading.Event()
        starts = Counter[int]()

        def flood() -> None:
            with httpx2.Client(timeout=15, verify=TLS) as client:
                while not stop.is_set():
                    answer = client.get(f"{outpost.url}/outpost.goauthentik.io/start?rd=%2Fheaders")
                    starts[answer.status_code] += 1

        threads = [threading.Thread(target=flood, daemon=True) for _ in range(20)]
        for thread in threads:
            thread.start()
        latencies, statuses = [], Counter[int]()
        ends = time.monotonic() + 5
        while time.monotonic() < ends:
            sent = time.monotonic()
            statuses[user.get(f"{outpost.url}/headers").status_code] += 1
            latencies.append(time.monotonic() - sent)
            time.sleep(0.02)
        stop.set()
        for thread in threads:
            thread.join(15)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n/start flood: {dict(starts)} in 5 s; signed-in requests: {len(latencies)}, p50 "
          f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert set(starts) == {302} and sum(starts.values()) > 100
    assert set(statuses) == {200}
    assert p99 < 1.0
