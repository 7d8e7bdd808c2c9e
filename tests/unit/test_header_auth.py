"""Header authentication's limits, through the chain (mitmproxy's test helpers), with the IdP's
calls replaced by a counter: options, the failure cache, single-flight, the client's bucket and
the provider's IdP budget."""

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost import chain, header_auth
from mitm_outpost.header_auth import OPTIONS, TokenBucket, client_key
from mitm_outpost.oidc import IdentityProvider, IdPUnavailable
from mitm_outpost.registry import Registry
from tests.unit.conftest import make_provider

GOOD = "Bearer good-token"


class FakeIdP:
    """Introspection that counts its calls and, while `held`, waits to answer."""

    def __init__(self) -> None:
        self.calls = 0
        self.held: asyncio.Event | None = None
        self.down = False

    async def introspect(self, idp: IdentityProvider, token: str) -> dict[str, Any]:
        self.calls += 1
        if self.held is not None:
            await self.held.wait()
        if self.down:
            raise IdPUnavailable("introspection failed: ConnectError")
        if token.startswith("good"):
            return {"active": True, "client_id": idp.client_id, "sub": "u1", "preferred_username": "alice"}
        return {"active": False}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeIdP:
    idp = FakeIdP()
    monkeypatch.setattr(IdentityProvider, "introspect", lambda self, token: idp.introspect(self, token))
    return idp


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.replace("test-outpost", (make_provider(introspection_endpoint="https://idp.example.test/introspect"),))
    return reg


@contextmanager
def outpost(registry: Registry, **options: int) -> Iterator[taddons.context]:
    addons = chain.build(registry, interactive=False)
    with taddons.context(addons) as tctx:
        # No answer here reaches the response hook, which would end its turn (test_turns.py): no turns.
        tctx.configure(addons, **{"header_auth_cache_ttl": 60, "outpost_anonymous_turns": 0, **options})
        yield tctx


def request(authorization: str, peer: str = "198.51.100.7") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, path=b"/api", headers=()))
    f.request.headers["Host"] = "app.example.test"
    f.request.headers["Accept"] = "application/json"
    f.request.headers["Authorization"] = authorization
    f.client_conn.peername = (peer, 40000)
    return f


async def send(tctx: taddons.context, *flows: http.HTTPFlow) -> list[int | None]:
    """The answers' statuses, None for a request let through; all requests at once."""
    await asyncio.gather(*(tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f)) for f in flows))
    return [f.response.status_code if f.response else None for f in flows]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_limit_must_be_at_least_one(registry: Registry, option: str) -> None:
    with outpost(registry) as tctx:
        before = getattr(tctx.options, option)
        with pytest.raises(exceptions.OptionsError, match=f"{option} must be a whole number of at least 1, not 0"):
            tctx.options.update(**{option: 0})
        assert getattr(tctx.options, option) == before  # refused, the old value kept


def test_options_are_declared_with_help_and_defaults(registry: Registry) -> None:
    with outpost(registry) as tctx:
        for option in OPTIONS:
            assert tctx.options._options[option].help
        assert (tctx.options.header_auth_failure_ttl, tctx.options.header_auth_client_burst,
                tctx.options.header_auth_client_rate, tctx.options.header_auth_idp_rate) == (10, 5, 1, 20)


async def test_a_refused_header_is_remembered_briefly(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_failure_ttl=1) as tctx:
        assert await send(tctx, request("Bearer bogus")) == [401]
        assert await send(tctx, request("Bearer bogus")) == [401]
        assert fake.calls == 1
        await asyncio.sleep(1.1)
        assert await send(tctx, request("Bearer bogus")) == [401]
        assert fake.calls == 2


async def test_identical_checks_in_flight_share_one_idp_call(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_client_burst=2) as tctx:  # one token for each of the two checks
        fake.held = asyncio.Event()
        flows = [request(GOOD) for _ in range(20)] + [request("Bearer bogus") for _ in range(20)]
        answers = asyncio.ensure_future(send(tctx, *flows))
        await asyncio.sleep(0.05)
        fake.held.set()
        assert await answers == [None] * 20 + [401] * 20  # one client, yet no 429: a shared check costs nothing more
        assert fake.calls == 2
        assert all(f.metadata["outpost"]["user"] == "alice" for f in flows[:20])


async def test_a_client_that_leaves_does_not_cancel_the_shared_check(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry) as tctx:
        fake.held = asyncio.Event()
        first = asyncio.ensure_future(send(tctx, request(GOOD)))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(send(tctx, request(GOOD)))
        await asyncio.sleep(0.01)
        first.cancel()
        fake.held.set()
        assert await second == [None] and fake.calls == 1


async def test_a_client_over_its_failures_gets_429_and_the_idp_is_not_asked(registry: Registry, fake: FakeIdP,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    with outpost(registry, header_auth_client_burst=3) as tctx:
        assert await send(tctx, request(GOOD)) == [None]  # a success costs the client nothing
        flows = [request(f"Bearer bogus-{n}") for n in range(10)]
        assert await send(tctx, *flows) == [401] * 3 + [429] * 7
        assert fake.calls == 1 + 3
        limited = flows[-1]
        assert limited.response.headers["Retry-After"] == "1"
        assert limited.metadata["outpost"]["code"] == "header_auth_rate_limited"
        assert "bogus" not in caplog.text and "bogus" not in limited.comment
        assert await send(tctx, request(GOOD)) == [None]  # remembered: no IdP call, no limit
        assert await send(tctx, request("Bearer good-but-new")) == [429]  # a new check waits like any other
        assert await send(tctx, request("Bearer bogus-x", peer="203.0.113.9")) == [401]  # another client has its own
        await asyncio.sleep(1.0)
        assert await send(tctx, request("Bearer good-but-new")) == [None]


async def test_a_client_cannot_have_more_checks_in_flight_than_its_burst(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_client_burst=2) as tctx:
        fake.held = asyncio.Event()
        answers = asyncio.ensure_future(send(tctx, *(request(f"Bearer good-{n}") for n in range(5))))
        await asyncio.sleep(0.05)
        fake.held.set()
        assert await answers == [None, None, 429, 429, 429]
        assert await send(tctx, *(request(f"Bearer good-{n}") for n in range(5, 10))) == [None, None, 429, 429, 429]


async def test_the_idp_budget_holds_for_many_clients(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_idp_rate=4) as tctx:
        flows = [request(f"Bearer bogus-{n}", peer=f"198.51.100.{n}") for n in range(30)]
        assert await send(tctx, *flows) == [401] * 4 + [429] * 26
        assert fake.calls == 4 and flows[-1].response.headers["Retry-After"] == "1"


async def test_an_idp_outage_is_a_503_and_is_not_remembered(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_client_burst=1) as tctx:
        fake.down = True
        assert await send(tctx, request(GOOD)) == [503]
        assert await send(tctx, request(GOOD)) == [503]  # asked again, and the client was not charged
        fake.down = False
        assert await send(tctx, request(GOOD)) == [None]
        assert fake.calls == 3


async def test_malformed_headers_are_refused_without_the_idp_or_the_bucket(registry: Registry, fake: FakeIdP) -> None:
    with outpost(registry, header_auth_client_burst=1) as tctx:
        assert await send(tctx, request("Basic !!!"), request("Bearer"), request("Bearer ")) == [401, 401, 401]
        assert await send(tctx, request(GOOD)) == [None] and fake.calls == 1


def test_the_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(header_auth.time, "monotonic", lambda: now[0])
    bucket = TokenBucket(5, 1)
    assert [bucket.take() for _ in range(6)] == [0, 0, 0, 0, 0, 1.0]
    now[0] += 0.25
    assert bucket.take() == 0.75
    now[0] += 0.75
    assert bucket.take() == 0 and bucket.take() == 1.0
    bucket.give_back()
    assert bucket.take() == 0
    now[0] += 3600
    assert [bucket.take() for _ in range(6)] == [0, 0, 0, 0, 0, 1.0]  # never more than its capacity
    for _ in range(10):
        bucket.give_back()
    assert bucket.tokens == 5


@pytest.mark.parametrize("peer, key", [
    ("192.0.2.1", "192.0.2.1"), ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"), ("2001:db8:1:2:bbbb::7", "2001:db8:1:2::/64"),
])
def test_clients_are_counted_by_address_and_ipv6_by_64(peer: str, key: str) -> None:
    assert client_key(peer) == key


async def test_failures_are_logged_without_the_credential(registry: Registry, fake: FakeIdP,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "mitm_outpost"), outpost(registry, header_auth_client_burst=1) as tctx:
        await send(tctx, request("Bearer secret-looking-token"), request("Bearer another-secret-token"))
    assert "header refused: the token is not active" in caplog.text
    assert ("GET app.example.test/api denied (header_auth_rate_limited): client 198.51.100.7: too many refused header "
            "authentications") in caplog.messages
    assert "secret-looking-token" not in caplog.text and "another-secret-token" not in caplog.text
