"""The addon chain driven through mitmproxy's own test helpers, without sockets."""

import logging
import time

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
from mitmproxy.test import taddons, tflow, tutils

from mitm_outpost import chain, decision, names
from mitm_outpost.chain import Chain
from mitm_outpost.gate import Gate
from mitm_outpost.identity import user_headers
from mitm_outpost.registry import Registry
from mitm_outpost.sessions import Session
from tests.unit.conftest import make_provider


def outpost(registry: Registry) -> Chain:
    """The production runner's chain, in its own order."""
    return chain.build(registry, interactive=False)


def flow(path: str = "/", host: str = "app.example.test", headers: dict[str, str] | None = None) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=1, path=path.encode(), headers=()))
    f.request.headers["Host"] = host
    for name, value in (headers or {}).items():
        f.request.headers.add(name, value)
    return f


async def run(registry: Registry, f: http.HTTPFlow) -> http.HTTPFlow:
    with taddons.context(outpost(registry)) as tctx:
        await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    return f


async def logged_in(registry: Registry) -> str:
    p = registry.providers[0]
    claims = {"sub": "u1", "preferred_username": "alice", "groups": ["a", "b"], "email": "a@x"}
    session = Session.of(provider=p.name, sub="u1", headers=user_headers(claims, "tok", True),
                         expires_at=time.time() + 60)
    await registry.store.put("sid-1", session)
    return f"{p.cookie_name}=sid-1"


async def test_unknown_host_is_a_400_and_recorded(registry: Registry) -> None:
    f = await run(registry, flow(host="other.test"))
    assert f.response.status_code == 400
    assert f.metadata["outpost"]["outcome"] == "denied" and "other.test" in f.comment
    assert f.marked == decision.MARKS[decision.Outcome.DENIED]


async def test_ping_answers_for_any_host(registry: Registry) -> None:
    f = await run(registry, flow("/outpost.goauthentik.io/ping", host="nobody.test"))
    assert f.response.status_code == 204


async def test_browser_without_session_is_sent_to_start(registry: Registry) -> None:
    f = await run(registry, flow("/a%2Fb?q=1", headers={"Accept": "text/html"}))
    assert f.response.status_code == 302
    assert f.response.headers["Location"] == (
        "https://app.example.test/outpost.goauthentik.io/start?rd=https%3A%2F%2Fapp.example.test%2Fa%252Fb%3Fq%3D1"
    )
    assert f.metadata["outpost"] == {"provider": "app", "mode": "proxy", "session": "none", "outcome": "redirected",
                                     "code": "no_session", "reason": "no session: sent to sign in, back to /a%2Fb"}


async def test_skip_rule_lets_through_without_identity(registry: Registry) -> None:
    f = await run(registry, flow("/public/x", headers={"X-authentik-username": "evil", "X_AUTHENTIK_GROUPS": "admins"}))
    assert f.response is None
    assert f.metadata["outpost"]["outcome"] == "skipped"
    assert not [k for k in f.request.headers if k.lower().replace("_", "-").startswith("x-authentik")]
    assert (f.request.host, f.request.port, f.request.headers["Host"]) == ("10.0.0.5", 8080, "app.example.test")


async def test_session_gets_identity_and_forwarding_headers(registry: Registry) -> None:
    cookie = await logged_in(registry)
    f = await run(registry, flow("/x", headers={"Cookie": f"a=1; {cookie}; b=2", "X-Forwarded-For": "6.6.6.6",
                                                "x-authentik-uid": "0"}))
    assert f.response is None
    headers = f.request.headers
    assert headers["X-authentik-username"] == "alice" and headers["X-authentik-groups"] == "a|b"
    assert headers.get_all("X-authentik-uid") == ["u1"]
    assert headers["X-authentik-meta-provider"] == "app" and headers["X-Auth-Username"] == "alice"
    assert headers["Cookie"] == "a=1; b=2"
    assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["X-Forwarded-Host"] == "app.example.test"
    assert f.metadata["outpost"]["outcome"] == "allowed" and f.metadata["outpost"]["user"] == "alice"
    # authentik's way: the URL goes to internal_host, Host stays the client's (seed 001).
    assert (f.request.scheme, f.request.host, f.request.port, headers["Host"]) == (
        "http", "10.0.0.5", 8080, "app.example.test")
    assert f.response is None and headers.get_all("Host") == ["app.example.test"]


async def test_upstream_host_internal_sends_the_backends_host(registry: Registry) -> None:
    registry.replace("test-outpost", (make_provider(upstream_host="internal"),))
    f = await run(registry, flow("/x", headers={"Cookie": await logged_in(registry)}))
    assert (f.request.host, f.request.headers["Host"], f.request.headers["X-Forwarded-Host"]) == (
        "10.0.0.5", "10.0.0.5:8080", "app.example.test")


@pytest.mark.parametrize("upstream_host, sent", [("client", "app.example.test"), ("internal", "10.0.0.5:8080")])
async def test_an_http2_request_goes_upstream_with_the_same_authority_as_host(registry: Registry, upstream_host: str,
                                                                              sent: str) -> None:
    registry.replace("test-outpost", (make_provider(upstream_host=upstream_host),))
    cookie = await logged_in(registry)
    f = flow("/x", headers={"Cookie": cookie})
    f.request.http_version, f.request.authority = "HTTP/2.0", "app.example.test"
    f = await run(registry, f)
    assert f.metadata["outpost"]["outcome"] == "allowed"
    assert (f.request.host, f.request.port, f.request.authority, f.request.host_header) == (
        "10.0.0.5", 8080, sent, sent)
    assert f.request.headers["X-Forwarded-Host"] == "app.example.test"


def test_what_exists_at_start_is_frozen_out_of_the_garbage_collector(registry: Registry) -> None:
    import gc

    from mitm_outpost.lifecycle import Lifecycle

    try:
        Lifecycle(registry).running()
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("headers", [{"X-Requested-With": "XMLHttpRequest"}, {"Accept": "application/json"}])
async def test_api_clients_get_401(registry: Registry, headers: dict[str, str]) -> None:
    f = await run(registry, flow("/x", headers=headers))
    assert f.response.status_code == 401


async def test_unknown_cookie_is_cleared(registry: Registry) -> None:
    p = registry.providers[0]
    f = await run(registry, flow("/x", headers={"Cookie": f"{p.cookie_name}=forged", "Accept": "text/html"}))
    assert f.response.status_code == 302
    assert any(c.startswith(f"{p.cookie_name}=; Max-Age=0") for c in f.response.headers.get_all("Set-Cookie"))
    assert f.metadata["outpost"]["session"] == "unknown or expired cookie"


async def test_start_binds_state_to_the_browser(registry: Registry) -> None:
    f = await run(registry, flow("/outpost.goauthentik.io/start?rd=https%3A%2F%2Fevil.test%2F"))
    location = f.response.headers["Location"]
    assert location.startswith("https://idp.example.test/authorize?") and "code_challenge_method=S256" in location
    p = registry.providers[0]
    assert any(c.startswith(p.login_cookie_name + "=") for c in f.response.headers.get_all("Set-Cookie"))
    assert "back to https://app.example.test/ (rd refused)" in f.comment


async def test_sign_out_ends_all_sessions_of_the_user(registry: Registry) -> None:
    cookie = await logged_in(registry)
    p = registry.providers[0]
    await registry.store.put("sid-2", await registry.store.get("app", "sid-1"))  # a second browser
    f = await run(registry, flow("/outpost.goauthentik.io/sign_out", headers={"Cookie": cookie}))
    assert f.response.status_code == 302 and f.response.headers["Location"].startswith("https://idp.example.test/logout?")
    assert await registry.store.get("app", "sid-1") is None and await registry.store.get("app", "sid-2") is None
    assert any(c.startswith(f"{p.cookie_name}=; Max-Age=0") for c in f.response.headers.get_all("Set-Cookie"))


def test_identity_header_names_have_one_source() -> None:
    """Each group of names.py is exactly what its producer sends, in order, and the groups make up the lists."""
    def sent(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[str, ...]:
        return tuple(name.decode() for name, _ in fields)

    assert sent(user_headers({"sub": "x"}, "", False)) == names.USER_HEADERS
    assert sent(user_headers({"sub": "x"}, "", True)) == (*names.USER_HEADERS, *names.LEGACY_HEADERS)
    assert sent(make_provider().static_headers) == names.META_HEADERS
    assert names.IDENTITY_HEADERS == (*names.USER_HEADERS, *names.META_HEADERS)
    assert names.ALL_IDENTITY_HEADERS == (*names.IDENTITY_HEADERS, *names.LEGACY_HEADERS)
    assert len({names.header_key(n) for n in names.ALL_IDENTITY_HEADERS}) == len(names.ALL_IDENTITY_HEADERS)
    assert all(n.startswith(names.AUTHENTIK_PREFIX) for n in names.IDENTITY_HEADERS)
    assert not any(n.startswith(names.AUTHENTIK_PREFIX) for n in names.LEGACY_HEADERS)
    assert all(value == value.strip() and b"\n" not in value
               for _, value in user_headers({"sub": "a\r\nX: y"}, "", False))


@pytest.fixture
def forward_registry() -> Registry:
    from mitm_outpost.registry import parse_networks
    from tests.unit.conftest import make_provider

    reg = Registry()
    reg.replace("test-outpost", (
        make_provider(name="single", mode="forward_single", external_host="https://app.example.test", internal_host="",
                      client_id="s"),
        make_provider(name="domain", mode="forward_domain", external_host="https://auth.corp.test", internal_host="",
                      cookie_domain="corp.test", client_id="d", skip_path_regex="^https://health\\.corp\\.test/ping$"),
    ))
    reg.trusted_networks = parse_networks(["127.0.0.0/8"])
    return reg


def traefik_check(host: str, uri: str, **headers: str) -> http.HTTPFlow:
    return flow("/outpost.goauthentik.io/auth/traefik", host="outpost:9000", headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": host, "X-Forwarded-Uri": uri, **headers})


async def test_forward_auth_from_untrusted_peer_is_403(forward_registry: Registry) -> None:
    f = traefik_check("app.example.test", "/")
    f.client_conn.peername = ("203.0.113.9", 5000)
    await run(forward_registry, f)
    assert f.response.status_code == 403 and "untrusted peer 203.0.113.9" in f.comment


@pytest.mark.parametrize("host, provider", [
    ("app.example.test", "single"), ("corp.test", "domain"), ("a.corp.test", "domain"), ("x.y.corp.test", "domain"),
    ("evilcorp.test", None), ("corp.test.evil.test", None),
])
async def test_domain_level_routing_needs_a_dot_boundary(forward_registry: Registry, host: str,
                                                         provider: str | None) -> None:
    f = await run(forward_registry, traefik_check(host, "/x"))
    if provider is None:
        assert f.response.status_code == 400
    else:
        assert f.metadata["outpost"]["provider"] == provider and f.response.status_code == 302


async def test_forward_auth_answers(forward_registry: Registry) -> None:
    session_cookie = None
    p = forward_registry.providers[1]
    claims = {"sub": "u1", "preferred_username": "alice"}
    await forward_registry.store.put("sid", Session.of(provider="domain", sub="u1",
                                                       headers=user_headers(claims, "", True),
                                                       expires_at=time.time() + 60))
    session_cookie = f"{p.cookie_name}=sid"

    ok = await run(forward_registry, traefik_check("a.corp.test", "/x", Cookie=session_cookie))
    assert ok.response.status_code == 200 and ok.response.content == b""
    assert (ok.response.headers["X-authentik-username"] == "alice"
            and ok.response.headers["X-authentik-meta-provider"] == "domain")

    skipped = await run(
        forward_registry, traefik_check("health.corp.test", "/ping", **{"X-authentik-username": "evil"}))
    assert skipped.response.status_code == 200 and skipped.response.headers["X-authentik-username"] == ""
    tricked = await run(forward_registry, traefik_check("private.corp.test", "/x?https://health.corp.test/ping"))
    assert tricked.response.status_code == 302

    login = await run(forward_registry, traefik_check("a.corp.test", "/page?q=1"))
    assert login.response.status_code == 302 and login.response.headers["Location"].startswith("https://idp.example.test/authorize?")
    assert any("Domain=corp.test" in c for c in login.response.headers.get_all("Set-Cookie"))

    nginx = flow("/outpost.goauthentik.io/auth/nginx", host="a.corp.test", headers={"X-Original-URL": "https://a.corp.test/x"})
    assert (await run(forward_registry, nginx)).response.status_code == 401


async def test_forward_auth_failure_is_never_2xx(forward_registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    async def store_down(*args: object) -> None:
        raise RuntimeError("store down")

    def cache_down(*args: object) -> None:
        raise RuntimeError("store down")

    cookie = f"{forward_registry.providers[1].cookie_name}=sid"
    monkeypatch.setattr(forward_registry.store, "get", store_down)
    monkeypatch.setattr(forward_registry.store, "cached", cache_down)
    f = await run(forward_registry, traefik_check("a.corp.test", "/x", Cookie=cookie))
    assert f.response.status_code == 503 and f.metadata["outpost"]["outcome"] == "denied"

    def broken_rules(self: object, target: str) -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(type(forward_registry.providers[1]), "is_skipped", broken_rules)
    f = await run(forward_registry, traefik_check("a.corp.test", "/x"))
    assert f.response.status_code == 403 and f.metadata["outpost"]["outcome"] == "denied"


async def test_an_addon_failure_never_lets_a_request_through(registry: Registry, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: object, flow: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(Gate, "requestheaders", broken)
    with caplog.at_level(logging.ERROR, "mitm_outpost"):
        f = await run(registry, flow("/private?token=q-secret", headers={"Accept": "text/html"}))
    assert f.response.status_code == 403 and f.metadata["outpost"]["code"] == "step_failed"
    assert ("addon error in test_an_addon_failure_never_lets_a_request_through.<locals>.broken "
            "(RuntimeError at test_chain.py:") in caplog.text
    assert "bug" not in caplog.text and "q-secret" not in caplog.text  # neither the message nor the query


def test_the_chain_refuses_an_addon_hook_it_would_not_call() -> None:
    class Sniffer:
        def websocket_message(self, flow: object) -> None:
            pass

    with pytest.raises(TypeError, match="Sniffer.websocket_message"):
        Chain([Sniffer()])

    class Slow:
        async def response(self, flow: object) -> None:
            pass

    with pytest.raises(TypeError, match="Slow.response"):
        Chain([Slow()])


def test_a_synchronous_hook_that_hands_back_a_coroutine_fails_as_a_step_does(
        caplog: pytest.LogCaptureFixture) -> None:
    """responseheaders: the upstream's answer is replaced by a 502; response: logged. The coroutine is closed,
    never left to warn that nobody awaited it."""
    ran: list[str] = []

    async def later() -> None:
        ran.append("later")

    class Sneaky:
        def responseheaders(self, flow: http.HTTPFlow):  # type: ignore[no-untyped-def]
            return later()

        def response(self, flow: http.HTTPFlow):  # type: ignore[no-untyped-def]
            return later()

    sneaky = Chain([Sneaky()])
    f = tflow.tflow(resp=True)
    with caplog.at_level(logging.ERROR, "mitm_outpost"):
        sneaky.responseheaders(f)
        assert f.response is not None and f.response.status_code == 502
        sneaky.response(f)
    assert ran == [] and "Sneaky.responseheaders" in caplog.text and "Sneaky.response (TypeError" in caplog.text


def test_empty_answers_are_independent_copies() -> None:
    from mitm_outpost import pages

    first, second = pages.empty(200), pages.empty(200)
    first.headers["X-authentik-username"] = "alice"
    assert "X-authentik-username" not in second.headers
    assert (second.status_code, second.reason, second.content, second.headers["Cache-Control"]) == (
        200, "OK", b"", "no-store")
    assert pages.empty(403).reason == "Forbidden"


async def test_back_channel_logout_token_rules(registry: Registry) -> None:
    import jwt as pyjwt

    p = registry.providers[0]
    await logged_in(registry)
    claims = {"iss": "https://idp.example.test", "aud": "app-client", "iat": int(time.time()), "jti": "j1", "sub": "u1",
              "events": {"http://schemas.openid.net/event/backchannel-logout": {}}}

    def post(token_claims: dict) -> http.HTTPFlow:
        f = flow("/outpost.goauthentik.io/backchannel_logout")
        f.request.method = "POST"
        f.request.urlencoded_form = {"logout_token": pyjwt.encode(token_claims, "s3cret", algorithm="HS256")}
        return f

    one = outpost(registry)  # one outpost: its replay memory lasts across requests

    async def run_full(f: http.HTTPFlow) -> http.HTTPFlow:
        from mitmproxy.proxy.layers.http import HttpRequestHook

        with taddons.context(one) as tctx:
            await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
            assert f.response is None  # the body is needed: decided in the request hook
            await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
        return f

    for bad in ({**claims, "nonce": "n"}, {k: v for k, v in claims.items() if k != "events"},
                {**claims, "aud": "other"}, {k: v for k, v in claims.items() if k != "jti"}):
        assert (await run_full(post(bad))).response.status_code == 400
    assert await registry.store.get(p.name, "sid-1") is not None
    assert (await run_full(post(claims))).response.status_code == 200
    assert await registry.store.get(p.name, "sid-1") is None
    replay = await run_full(post(claims))
    assert replay.response.status_code == 400 and "replayed" in replay.comment


def test_legacy_header_names_can_be_switched_off() -> None:
    with_legacy = {name for name, _ in user_headers({"sub": "x"}, "", True)}
    without = {name for name, _ in user_headers({"sub": "x"}, "", False)}
    assert {n.encode() for n in names.LEGACY_HEADERS} <= with_legacy
    assert not {n.encode() for n in names.LEGACY_HEADERS} & without


async def test_an_http2_body_is_framed_for_an_http1_upstream(registry: Registry) -> None:
    """HTTP/2 needs no Content-Length; an HTTP/1 upstream does, or the body reads as a second request."""
    from mitmproxy.proxy.layers.http import HttpRequestHook

    cookie = await logged_in(registry)
    f = flow("/x", headers={"Cookie": cookie})
    f.request.http_version, f.request.authority, f.request.method = "HTTP/2.0", "app.example.test", "POST"
    f.request.headers.pop("Content-Length", None)
    with taddons.context(outpost(registry)) as tctx:
        await tctx.master.addons.handle_lifecycle(HttpRequestHeadersHook(f))
        assert f.request.headers["Transfer-Encoding"] == "chunked"  # in case mitmproxy streams it
        f.request.raw_content = b"GET /admin HTTP/1.1\r\n\r\n"
        await tctx.master.addons.handle_lifecycle(HttpRequestHook(f))
    assert f.response is None and "Transfer-Encoding" not in f.request.headers
    assert f.request.headers["Content-Length"] == str(len(b"GET /admin HTTP/1.1\r\n\r\n"))


def test_client_strings_in_log_lines_cannot_forge_a_line() -> None:
    assert (decision.printable("a\r\nFAKE\x00\x1b[31m\x7f\x85\u2028\udcff ok")
            == "a\\x0d\\x0aFAKE\\x00\\x1b[31m\\x7f\\x85\\u2028\\udcff ok")
    assert decision.printable("x" * 300) == "x" * 200 and decision.without_query("/a?token=1#f") == "/a"


async def test_the_exchange_never_travels_with_the_flows_state() -> None:
    """Cookie values and the session stay out of what mitmproxy saves, shows and copies."""
    registry = Registry()
    registry.replace("test", (make_provider(),))
    cookie = await logged_in(registry)
    f = await run(registry, flow("/", headers={"Cookie": cookie}))
    exchange = decision.exchange_of(f)
    assert exchange is not None and exchange.session_cookie and exchange.session is not None
    assert exchange.session_cookie not in repr(f.get_state())
    assert decision.exchange_of(f.copy()) is None
