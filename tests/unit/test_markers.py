"""authentik's query markers: `X-authentik-auth-callback=true` and `X-authentik-logout=true` make any path of a
provider's host the callback or the sign-out, in proxy mode and in the original URL of a forward-auth check."""

import time
import urllib.parse
from typing import Any

import jwt as pyjwt
import pytest
from mitmproxy import http

from mitm_outpost import names
from mitm_outpost.endpoints import marker
from mitm_outpost.identity import user_headers
from mitm_outpost.oidc import IdentityProvider
from mitm_outpost.registry import Registry
from mitm_outpost.sessions import Session
from tests.unit.test_chain import flow, forward_registry, logged_in, run, traefik_check  # noqa: F401 (a fixture)

CALLBACK = (names.CALLBACK_MARKER, names.CALLBACK)
SIGN_OUT = (names.LOGOUT_MARKER, names.SIGN_OUT)
IDP_LOGOUT = "https://idp.example.test/logout?"
NONCES: list[str] = []  # of the logins started, for the ID token the IdP double hands out


@pytest.mark.parametrize(("query", "found"), [
    ("", None),
    ("a=1&b=2", None),
    ("X-authentik-auth-callback=true", CALLBACK),
    ("code=c&X-authentik-auth-callback=TRUE&state=s", CALLBACK),  # the value in any case
    ("X-authentik-logout=True", SIGN_OUT),
    ("X-authentik-logout=true&X-authentik-auth-callback=true", CALLBACK),  # the callback is tested first
    ("X%2Dauthentik-logout=%74rue", SIGN_OUT),  # decoded, as Go's url.Values
    ("x-authentik-logout=true", None),  # the key is case-sensitive
    ("X-authentik-logout=1", None),
    ("X-authentik-logout", None),
    ("X-authentik-logout=", None),
    ("X-authentik-logout=false&X-authentik-logout=true", None),  # the first value counts (Values.Get)
    ("q=X-authentik-logout=true", None),
    ("X-authentik-logout=true%00", None),
])
def test_which_queries_carry_a_marker(query: str, found: tuple[str, str] | None) -> None:
    assert marker(query) == found


@pytest.fixture
def idp_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The IdP's token endpoint: an HS256 ID token for alice, with the nonce the login asked for."""
    async def exchange_code(self: IdentityProvider, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        assert code == "the-code"
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": self.client_id, "sub": "alice", "preferred_username": "alice",
                  "iat": now, "exp": now + 60, "nonce": NONCES[-1]}
        return {"id_token": pyjwt.encode(claims, self.client_secret, algorithm="HS256")}

    NONCES.clear()
    monkeypatch.setattr(IdentityProvider, "exchange_code", exchange_code)



def login_started(f: http.HTTPFlow) -> tuple[str, str]:
    """The state the IdP will echo and the pre-login cookie, from an answer that sent the browser to the IdP."""
    assert f.response is not None and f.response.status_code == 302, f.comment
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(f.response.headers["Location"]).query)
    NONCES.append(params["nonce"][0])
    cookie = next(c for c in f.response.headers.get_all("Set-Cookie") if "_login=" in c)
    return params["state"][0], cookie.split(";", 1)[0]


def session_cookie(f: http.HTTPFlow, name: str) -> str | None:
    return next((c.split(";", 1)[0] for c in f.response.headers.get_all("Set-Cookie")  # type: ignore[union-attr]
                 if c.startswith(name + "=") and "Max-Age=0" not in c), None)


async def test_a_callback_on_any_path_signs_in(registry: Registry, idp_answers: None) -> None:
    state, login_cookie = login_started(await run(registry, flow("/outpost.goauthentik.io/start?rd=/headers")))
    query = urllib.parse.urlencode({names.CALLBACK_MARKER: "true", "code": "the-code", "state": state})
    f = await run(registry, flow(f"/some/page?{query}", headers={"Cookie": login_cookie}))
    assert f.response.status_code == 302 and f.response.headers["Location"] == "https://app.example.test/headers"
    assert session_cookie(f, registry.providers[0].cookie_name)
    record = f.metadata["outpost"]
    assert (record["endpoint"], record["marker"], record["code"]) == ("callback", names.CALLBACK_MARKER, "signed_in")
    assert f.request.host == "app.example.test"  # answered by the outpost: never re-targeted at the app


async def test_a_marked_callback_that_fails_is_answered_not_proxied(registry: Registry) -> None:
    html = {"Accept": "text/html"}
    f = await run(registry, flow("/app/x?X-authentik-auth-callback=true&code=c&state=forged", headers=html))
    assert f.response.status_code == 400 and f.metadata["outpost"]["code"] == "state_invalid"
    unmarked = await run(registry, flow("/app/x?X-authentik-auth-callback=yes", headers=html))
    assert unmarked.response.status_code == 302
    assert "/outpost.goauthentik.io/start?rd=" in unmarked.response.headers["Location"]


async def test_a_logout_marker_on_any_path_signs_out(registry: Registry) -> None:
    cookie = await logged_in(registry)
    f = await run(registry, flow("/reports/2024?X-authentik-logout=true&x=1", headers={"Cookie": cookie}))
    assert f.response.status_code == 302 and f.response.headers["Location"].startswith(IDP_LOGOUT)
    assert await registry.store.get("app", "sid-1") is None
    cleared = f"{registry.providers[0].cookie_name}=; Max-Age=0"
    assert any(c.startswith(cleared) for c in f.response.headers.get_all("Set-Cookie"))
    assert (f.metadata["outpost"]["marker"], f.metadata["outpost"]["code"]) == (names.LOGOUT_MARKER, "sign_out")


async def test_a_cross_site_logout_marker_asks_and_its_form_posts_the_marker(registry: Registry) -> None:
    cookie = await logged_in(registry)
    f = await run(registry, flow("/reports?X-authentik-logout=true",
                                 headers={"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}))
    assert f.response.status_code == 200 and f.metadata["outpost"]["code"] == "sign_out_confirm"
    assert '<form method="post" action="?X-authentik-logout=true">' in f.response.text
    assert await registry.store.get("app", "sid-1") is not None
    post = flow("/reports?X-authentik-logout=true", headers={"Cookie": cookie, "Sec-Fetch-Site": "same-origin"})
    post.request.method = "POST"
    assert (await run(registry, post)).response.status_code == 303
    assert await registry.store.get("app", "sid-1") is None


async def domain_session(registry: Registry) -> str:
    p = registry.providers[1]
    headers = user_headers({"sub": "u1", "preferred_username": "alice"}, "", True)
    session = Session.of(provider=p.name, sub="u1", headers=headers, expires_at=time.time() + 60)
    await registry.store.put("sid", session)
    return f"{p.cookie_name}=sid"


def check(kind: str, uri: str, method: str = "GET", **headers: str) -> http.HTTPFlow:
    """A check as each proxy sends it (docs/forward-auth/README.md), for http(s)://a.corp.test<uri>."""
    if kind == "traefik":
        f = traefik_check("a.corp.test", uri, **headers)
    elif kind == "caddy":  # Caddy also appends the original query to the check's own path
        query = uri.partition("?")[2]
        f = flow(f"/outpost.goauthentik.io/auth/caddy?{query}", host="a.corp.test", headers={
            "X-Forwarded-Proto": "https", "X-Forwarded-Host": "a.corp.test", "X-Forwarded-Uri": uri, **headers})
    elif kind == "envoy":
        f = flow(f"/outpost.goauthentik.io/auth/envoy{uri}", host="a.corp.test",
                 headers={"X-Forwarded-Proto": "https", **headers})
    else:
        f = flow("/outpost.goauthentik.io/auth/nginx", host="a.corp.test",
                 headers={"X-Original-URL": f"https://a.corp.test{uri}", **headers})
    f.request.method = method
    return f


RELAYING = ("traefik", "caddy", "envoy")  # relay a non-2xx answer (status, Location, Set-Cookie) to the browser


@pytest.mark.parametrize("kind", RELAYING)
async def test_a_checked_callback_signs_in_and_sends_the_browser_back(forward_registry: Registry, idp_answers: None,
                                                                      kind: str) -> None:
    state, login_cookie = login_started(await run(forward_registry, check(kind, "/page?q=1")))
    uri = f"/outpost.goauthentik.io/callback?X-authentik-auth-callback=true&code=the-code&state={state}"
    f = await run(forward_registry, check(kind, uri, Cookie=login_cookie))
    assert f.response.status_code == 302 and f.response.headers["Location"] == "https://a.corp.test/page?q=1"
    cookie = session_cookie(f, forward_registry.providers[1].cookie_name)
    assert cookie and f.metadata["outpost"]["marker"] == names.CALLBACK_MARKER
    allowed = await run(forward_registry, check(kind, "/page?q=1", Cookie=cookie))
    assert allowed.response.status_code == 200 and allowed.response.headers["X-authentik-username"] == "alice"


@pytest.mark.parametrize("kind", RELAYING)
async def test_a_checked_callback_that_fails_is_never_2xx(forward_registry: Registry, kind: str) -> None:
    f = await run(forward_registry, check(kind, "/x?X-authentik-auth-callback=true&code=c&state=forged"))
    assert f.response.status_code == 400 and '<a href="/">' in f.response.text  # /start may not reach the outpost


@pytest.mark.parametrize("kind", RELAYING)
async def test_a_checked_logout_marker_signs_out(forward_registry: Registry, kind: str) -> None:
    cookie = await domain_session(forward_registry)
    f = await run(forward_registry, check(kind, "/any/page?X-authentik-logout=true", Cookie=cookie,
                                          Referer="https://b.corp.test/"))
    assert f.response.status_code == 302 and f.response.headers["Location"].startswith(IDP_LOGOUT)
    assert any("Max-Age=0" in c and "Domain=corp.test" in c for c in f.response.headers.get_all("Set-Cookie"))
    assert await forward_registry.store.get("domain", "sid") is None
    assert f.metadata["outpost"]["marker"] == names.LOGOUT_MARKER
    again = await run(forward_registry, check(kind, "/any/page?X-authentik-logout=true", **{"Sec-Fetch-Site": "none"}))
    assert again.response.status_code == 403 and "You are signed out." in again.response.text  # 200: on to the app


@pytest.mark.parametrize(("kind", "headers"), [
    ("traefik", {"Sec-Fetch-Site": "cross-site"}),
    ("caddy", {"Origin": "https://evil.test"}),
    ("traefik", {}),  # no header says which site: asked, through every proxy
    ("envoy", {}),  # Envoy's documented config passes none of them
])
async def test_a_checked_sign_out_that_may_be_cross_site_asks_with_a_non_2xx_page(
        forward_registry: Registry, kind: str, headers: dict[str, str]) -> None:
    cookie = await domain_session(forward_registry)
    f = await run(forward_registry, check(kind, "/page?X-authentik-logout=true", Cookie=cookie, **headers))
    assert f.response.status_code == 403 and f.metadata["outpost"]["code"] == "sign_out_confirm"
    assert '<form method="post" action="?X-authentik-logout=true">' in f.response.text
    assert "frame-ancestors 'none'" in f.response.headers["Content-Security-Policy"]
    assert await forward_registry.store.get("domain", "sid") is not None


async def test_the_confirmation_post_through_envoy_signs_out(forward_registry: Registry) -> None:
    """Envoy keeps the method; SameSite=Lax keeps the cookie off a POST another site sends."""
    cookie = await domain_session(forward_registry)
    f = await run(forward_registry, check("envoy", "/page?X-authentik-logout=true", "POST", Cookie=cookie))
    assert f.response.status_code == 303 and await forward_registry.store.get("domain", "sid") is None


@pytest.mark.parametrize(("query", "code"), [("X-authentik-auth-callback=true&code=c&state=s", "callback_marker"),
                                             ("X-authentik-logout=true", "sign_out_marker")])
async def test_nginx_cannot_relay_a_marked_answer_and_gets_403(forward_registry: Registry, query: str,
                                                                code: str) -> None:
    """auth_request takes 2xx, 401, 403: a 2xx would pass the marker (and a code) to the app, and a 401 becomes
    nginx's sign-in redirect back to the same marked URL, a loop. No session is ended."""
    cookie = await domain_session(forward_registry)
    f = await run(forward_registry, check("nginx", f"/x?{query}", Cookie=cookie, Referer="https://a.corp.test/"))
    assert f.response.status_code == 403 and f.metadata["outpost"]["code"] == code
    assert f.metadata["outpost"]["outcome"] == "denied"
    assert await forward_registry.store.get("domain", "sid") is not None

